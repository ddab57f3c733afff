"""Conversations -> text pieces, each marked as training target or context.

Presets "deepseek_v4" (the release's non-thinking chat mode) and "deepseek_v4_thinking" (thinking mode,
earlier reasoning dropped) follow the encoding reference shipped with the release. Invariants: the loss
mask covers exactly the reply text and its EOS; role markers are special tokens, so token boundaries fall
on piece boundaries and the ids equal those of the whole string. A reply given as text is split at the
first `</think>` (`split_reply`). The one difference from the release: every assistant turn is cued.
Rendering rules and the markers: docs/data.md.
"""

import dataclasses
from typing import Mapping, Sequence

from data.formats import Message

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Strings around each turn. `assistant_prefix` is context (it cues the reply, and ends a
    generation prompt); `assistant_suffix` is a target (the model must learn to stop). A thinking
    template (non-empty `thinking_prefix`) cues the replies after the last user turn with
    `thinking_prefix` instead, and trains them on `{reasoning}{thinking_suffix}{reply}`."""

    name: str
    bos: str
    eos: str
    pad: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    special_tokens: tuple[str, ...]  # every marker that must be one vocabulary entry
    thinking_prefix: str = ""
    thinking_suffix: str = ""

    @property
    def thinking(self) -> bool:
        """Whether the template reasons in the replies after the last user turn."""
        return bool(self.thinking_prefix)


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    target: bool  # part of an assistant reply (its text or its end marker)
    turn: int  # index of the message it belongs to


DEEPSEEK_V4 = ChatTemplate(
    name="deepseek_v4",
    bos=BOS,
    eos=EOS,
    pad=PAD,
    system_prefix="",
    system_suffix="",
    user_prefix=USER,
    user_suffix="",
    assistant_prefix=ASSISTANT + THINK_END,
    assistant_suffix=EOS,
    special_tokens=(BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END),
)

DEEPSEEK_V4_THINKING = dataclasses.replace(
    DEEPSEEK_V4, name="deepseek_v4_thinking", thinking_prefix=ASSISTANT + THINK_START, thinking_suffix=THINK_END
)

PRESETS = {t.name: t for t in (DEEPSEEK_V4, DEEPSEEK_V4_THINKING)}
CUSTOM = "custom"


def get_template(name: str, custom: Mapping[str, str] | None = None) -> ChatTemplate:
    """A preset by name, or (name "custom") a template from config fields: bos, eos, pad,
    system/user/assistant prefix/suffix, `special_tokens` (the markers to keep whole) and optionally
    thinking_prefix/suffix."""
    if name in PRESETS:
        return PRESETS[name]
    if name != CUSTOM:
        raise ValueError(f"unknown chat template {name!r}; choose one of {sorted(PRESETS) + [CUSTOM]}")
    if custom is None:
        raise ValueError("template 'custom' needs the custom_template fields")
    fields = dict(custom)
    fields["special_tokens"] = tuple(fields.get("special_tokens", ()))
    return ChatTemplate(name=CUSTOM, **fields)


def split_reply(template: ChatTemplate, text: str) -> tuple[str, str] | None:
    """(reasoning, content) of a reply written as the model writes it after the generation cue,
    without the end marker: in a thinking template the text around the first `thinking_suffix`
    (None when the text has none), else ("", text)."""
    if not template.thinking:
        return "", text
    reasoning, found, content = text.partition(template.thinking_suffix)
    return (reasoning, content) if found else None


def render(template: ChatTemplate, messages: Sequence[Message], *, generation_prompt: bool = False) -> list[Piece]:
    """The pieces of a conversation; with `generation_prompt`, ends with the reply cue."""
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)

    def thinks(turn):  # thinking templates reason in the replies after the last user turn
        return template.thinking and turn > last_user

    pieces = [Piece(template.bos, False, 0)]
    for turn, message in enumerate(messages):
        if message.role == "system":
            parts = [(template.system_prefix, False), (message.content, False), (template.system_suffix, False)]
        elif message.role == "user":
            parts = [(template.user_prefix, False), (message.content, False), (template.user_suffix, False)]
        elif thinks(turn):
            parts = [
                (template.thinking_prefix, False),
                (message.reasoning, True),
                (template.thinking_suffix, True),
                (message.content, True),
                (template.assistant_suffix, True),
            ]
        else:
            parts = [(template.assistant_prefix, False), (message.content, True), (template.assistant_suffix, True)]
        pieces.extend(Piece(text, target, turn) for text, target in parts)
    if generation_prompt:
        cue = template.thinking_prefix if thinks(len(messages)) else template.assistant_prefix
        pieces.append(Piece(cue, False, len(messages)))
    return [p for p in pieces if p.text]


def render_reply(template: ChatTemplate, context: Sequence[Message], reply: Message) -> tuple[list[Piece], list[Piece]]:
    """(prompt, reply) pieces of the conversation `context` + `reply`: the prompt ends with the
    reply's cue (it equals render(context, generation_prompt=True)); the reply is that turn's
    targets, exactly what SFT trains on when a conversation ends with it."""
    pieces = render(template, (*context, reply))
    start = next(i for i, p in enumerate(pieces) if p.target and p.turn == len(context))
    return pieces[:start], pieces[start:]


def render_text(template: ChatTemplate, messages: Sequence[Message], *, generation_prompt: bool = False) -> str:
    return "".join(p.text for p in render(template, messages, generation_prompt=generation_prompt))
