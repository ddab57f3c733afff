"""Exact-match accuracy of a model on held-out conversations, given a generate function.

The trainer owns decoding (it has the model and the mesh); this module owns what a prompt is and
what counts as a correct answer, so training curves and the sample tasks agree on both.
"""

from typing import Callable, Sequence

import numpy as np

from data.chat_template import render, split_reply
from data.encode import Encoder
from data.formats import Conversation

# generate(prompts) -> completions: each prompt int32[P] ends with the reply cue; each completion is
# the ids sampled after it (it may run past the end-of-reply marker; we cut there).
GenerateFn = Callable[[list[np.ndarray]], Sequence[Sequence[int]]]


def split_last_reply(conversation: Conversation) -> tuple[tuple, str]:
    """(context messages, reference reply) of a conversation."""
    return conversation.messages[:-1], conversation.messages[-1].content


def completion_text(ids: Sequence[int], encoder: Encoder) -> str:
    """The reply text of generated ids, stripped: everything before the first end-of-reply marker,
    and with a thinking template only the answer after the reasoning ("" if the reasoning never ended)."""
    end = encoder.tokenizer.token_id(encoder.template.eos)
    ids = list(ids)
    reply = split_reply(encoder.template, encoder.tokenizer.decode(ids[: ids.index(end)] if end in ids else ids))
    return reply[1].strip() if reply else ""


def exact_match_accuracy(
    conversations: Sequence[Conversation], generate: GenerateFn, encoder: Encoder
) -> dict[str, float]:
    """{"accuracy", "correct", "total"}: a reply counts if it equals the reference after stripping
    surrounding whitespace."""
    contexts, references = zip(*(split_last_reply(c) for c in conversations))
    rendered = [render(encoder.template, ctx, generation_prompt=True) for ctx in contexts]
    prompts = [np.asarray(ids, np.int32) for ids, _ in encoder.pieces_to_ids(rendered)]
    completions = generate(prompts)
    correct = sum(completion_text(c, encoder) == ref.strip() for c, ref in zip(completions, references))
    return {"accuracy": correct / len(references), "correct": correct, "total": len(references)}
