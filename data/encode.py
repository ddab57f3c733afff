"""Records -> token ids: SFT examples with loss masks, preference triples, prompts.

Loss mask convention (the one the model's loss consumes): `loss_mask[i] == 1` marks token i as a
training target, i.e. a token of an assistant reply, its end marker included. The model scores the
head at position i-1 on it. Which replies count is the mode:
- "all_assistant_turns": every reply of the conversation;
- "last_assistant_turn": only the final reply (earlier replies are context).
"""

import dataclasses
from typing import Sequence

import numpy as np

from data.chat_template import ChatTemplate, Piece, render, render_reply, split_reply
from data.errors import DataError, InvalidRecord, LoadStats
from data.formats import Conversation, Message, PreferencePair, PromptRecord
from data.jsonl import Located
from data.tokenizer import Tokenizer

REFERENCE_LOGPS = "reference_logps"  # float32[2] of a pair, [B, 2] in a DPO batch
LOSS_MASK_MODES = ("all_assistant_turns", "last_assistant_turn")


@dataclasses.dataclass(frozen=True)
class Encoder:
    """Tokenizer + template + mask mode, checked against each other and the model's vocabulary."""

    tokenizer: Tokenizer
    template: ChatTemplate
    loss_mask_mode: str
    vocab_size: int  # the model's embedding rows; every id must be below it

    def __post_init__(self):
        if self.loss_mask_mode not in LOSS_MASK_MODES:
            raise ValueError(f"loss_mask mode {self.loss_mask_mode!r} is not one of {LOSS_MASK_MODES}")
        for marker in self.template.special_tokens:
            self.tokenizer.token_id(marker)
        if self.tokenizer.vocab_size > self.vocab_size:
            raise DataError(
                self.tokenizer.path,
                f"the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                f"only {self.vocab_size} embedding rows (config.model.vocab_size)",
                reason="vocab_too_large",
            )

    def check_texts(self, texts: Sequence[str]) -> None:
        """User text must not contain the template's markers: they would be read as real turn
        boundaries (a "reply" smuggled into a prompt, or an early EOS)."""
        for text in texts:
            for marker in self.template.special_tokens:
                if marker in text:
                    raise InvalidRecord("reserved_token", f"text contains the template marker {marker!r}")

    def check_messages(self, messages: Sequence[Message]) -> None:
        """`check_texts` on the messages' contents and reasonings."""
        self.check_texts([text for m in messages for text in (m.content, m.reasoning)])

    def reply_message(self, text: str, *, ended: bool = True) -> Message:
        """The assistant message of a reply given as text, as the model writes it after the reply cue
        (chat_template.split_reply). Refused: a marker other than the one thinking suffix, and in a
        thinking template an ended reply without that suffix (the release's parser refuses it too). A
        reply not `ended` (a completion cut off by the length limit) may stop inside its reasoning."""
        split = split_reply(self.template, text)
        if split is None and ended:
            raise InvalidRecord(
                "missing_think_end",
                f"in thinking mode a reply is '{{reasoning}}"
                f"{self.template.thinking_suffix}{{answer}}'; this one has no "
                f"{self.template.thinking_suffix!r}",
            )
        reasoning, content = split or (text, "")
        message = Message("assistant", content, reasoning)
        self.check_messages([message])
        return message

    def pieces_to_ids(self, batch: Sequence[Sequence[Piece]]) -> list[tuple[list[int], list[int]]]:
        """(ids, per-id target flag) for each rendered conversation; one tokenizer call in all."""
        flat = [p for pieces in batch for p in pieces]
        encoded = iter(self.tokenizer.encode_batch([p.text for p in flat]))
        out = []
        for pieces in batch:
            last_turn = max((p.turn for p in pieces if p.target), default=-1)
            ids, mask = [], []
            for piece in pieces:
                piece_ids = next(encoded)
                wanted = piece.target and (self.loss_mask_mode == "all_assistant_turns" or piece.turn == last_turn)
                ids.extend(piece_ids)
                mask.extend([int(wanted)] * len(piece_ids))
            out.append((ids, mask))
        return out

    def check_vocab(self, ids: np.ndarray) -> None:
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise InvalidRecord(
                "token_out_of_vocab", f"token id {int(bad[0])} is outside the vocabulary of {self.vocab_size}"
            )

    def ids(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(i, np.int32) for i in self.tokenizer.encode_batch(texts)]


def reject(located: Located, error: InvalidRecord, *, skip_bad: bool, stats: LoadStats) -> None:
    """Strict mode: raise naming file and line. Skip mode: count the reason."""
    if not skip_bad:
        raise DataError(located.path, error.detail, line=located.line, reason=error.reason) from None
    stats.skip(error.reason)


def encode_sft(
    records: Sequence[Located], encoder: Encoder, *, skip_bad: bool, stats: LoadStats
) -> list[dict[str, np.ndarray]]:
    """{"tokens": int32[L], "loss_mask": int32[L]} per record, in order; bad ones raise or count."""
    clean = []
    for located in records:
        try:
            if isinstance(located.record, Conversation):
                encoder.check_messages(located.record.messages)
            clean.append(located)
        except InvalidRecord as e:
            reject(located, e, skip_bad=skip_bad, stats=stats)
    rendered = iter(
        encoder.pieces_to_ids(
            [render(encoder.template, r.record.messages) for r in clean if isinstance(r.record, Conversation)]
        )
    )
    examples = []
    for located in clean:
        record = located.record
        ids, mask = next(rendered) if isinstance(record, Conversation) else (record.tokens, record.loss_mask)
        example = {"tokens": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32)}
        try:
            encoder.check_vocab(example["tokens"])
            examples.append(example)
        except InvalidRecord as e:
            reject(located, e, skip_bad=skip_bad, stats=stats)
    return examples


def encode_preference(pair: PreferencePair, encoder: Encoder) -> dict[str, np.ndarray]:
    """prompt int32[P] (ending with the reply cue), chosen int32[C], rejected int32[R], and the
    pair's reference log-probabilities float32[2] (chosen, rejected) when it has them. Each reply is
    given as the model writes it after the cue (`Encoder.reply_message`) and encoded as SFT encodes
    the same conversation's last reply: in thinking mode `{reasoning}</think>{answer}`, and always
    the template's end-of-reply marker, as the model must learn to emit it."""
    encoder.check_messages(pair.prompt)
    (prompt, chosen), (_, rejected) = (
        render_reply(encoder.template, pair.prompt, encoder.reply_message(text))
        for text in (pair.chosen, pair.rejected)
    )
    prompt_ids, chosen_ids, rejected_ids = (
        np.asarray(ids, np.int32) for ids, _ in encoder.pieces_to_ids([prompt, chosen, rejected])
    )
    encoded = {"prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids}
    if pair.reference_logps is not None:
        encoded[REFERENCE_LOGPS] = np.asarray(pair.reference_logps, np.float32)
    return encoded


def preference_sequences(encoded: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    """The two full sequences of a pair in SFT form (prompt masked out, reply as target), so DPO
    can reuse packing: {"chosen"|"rejected": {"tokens": int32[P+C], "loss_mask": int32[P+C]}}."""
    prompt = encoded["prompt"]
    out = {}
    for side in ("chosen", "rejected"):
        reply = encoded[side]
        out[side] = {
            "tokens": np.concatenate([prompt, reply]),
            "loss_mask": np.concatenate([np.zeros_like(prompt), np.ones_like(reply)]),
        }
    return out


def encode_prompt(record: PromptRecord, encoder: Encoder) -> dict:
    """{"prompt": int32[P] ending with the reply cue, "answer": str | None, "extra": dict}."""
    encoder.check_messages(record.prompt)
    ((prompt, _),) = encoder.pieces_to_ids([render(encoder.template, record.prompt, generation_prompt=True)])
    return {"prompt": np.asarray(prompt, np.int32), "answer": record.answer, "extra": record.extra}
