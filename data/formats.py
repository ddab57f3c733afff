"""The record forms users bring, checked field by field into small immutable dataclasses.

Each `parse_*` function takes one decoded JSON value and returns a record or raises
`InvalidRecord(reason, detail)`; `jsonl` adds the file and line. Reason codes are stable because
they become metrics keys (`data/skipped/<reason>`). SFT records are messages, prompt/completion or
pre-tokenised; preference pairs (DPO) may carry the reference's log-probabilities; prompt sets (GRPO)
keep extra fields for the reward function. The fields of each form: docs/data.md.
"""

import dataclasses
import math
from typing import Any

from data.errors import InvalidRecord

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str
    reasoning: str = ""  # an assistant's `reasoning_content` (rendered by thinking templates only)


@dataclasses.dataclass(frozen=True)
class Conversation:
    """An SFT conversation; the last message is an assistant turn."""

    messages: tuple[Message, ...]


@dataclasses.dataclass(frozen=True)
class Pretokenized:
    """An SFT example given as ids; the mask marks target tokens (same convention as batches)."""

    tokens: tuple[int, ...]
    loss_mask: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt (conversation without the final answer) and two candidate assistant replies."""

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    reference_logps: tuple[float, float] | None = None  # (chosen, rejected) under the reference model


@dataclasses.dataclass(frozen=True)
class PromptRecord:
    """A prompt to sample from; `answer` and `extra` are what a reward function may check."""

    prompt: tuple[Message, ...]
    answer: str | None
    extra: dict


def _require_object(value: Any) -> dict:
    if not isinstance(value, dict):
        raise InvalidRecord("wrong_type", f"a record must be a JSON object, got {type(value).__name__}")
    return value


def _require_str(record: dict, field: str, *, non_empty: bool = False, reason: str = "empty_field") -> str:
    if field not in record:
        raise InvalidRecord("missing_field", f"missing field {field!r}")
    value = record[field]
    if not isinstance(value, str):
        raise InvalidRecord("wrong_type", f"field {field!r} must be a string, got {type(value).__name__}")
    if non_empty and not value.strip():
        raise InvalidRecord(reason, f"field {field!r} is empty")
    return value


def _parse_message(value: Any, index: int) -> Message:
    if not isinstance(value, dict):
        raise InvalidRecord("wrong_type", f"messages[{index}] must be an object, got {type(value).__name__}")
    if "role" not in value:
        raise InvalidRecord("missing_role", f"messages[{index}] has no 'role'")
    role = value["role"]
    if role not in ROLES:
        raise InvalidRecord("unknown_role", f"messages[{index}] has role {role!r}; expected one of {ROLES}")
    content = value.get("content")
    if not isinstance(content, str):
        raise InvalidRecord("wrong_type", f"messages[{index}].content must be a string, got {type(content).__name__}")
    if role == "assistant" and not content.strip():
        raise InvalidRecord("empty_assistant", f"messages[{index}] is an empty assistant turn")
    reasoning = value.get("reasoning_content", "") if role == "assistant" else ""
    if not isinstance(reasoning, str):
        raise InvalidRecord("wrong_type", f"messages[{index}].reasoning_content must be a string")
    return Message(role, content, reasoning)


def _parse_messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise InvalidRecord("wrong_type", f"'messages' must be a list, got {type(value).__name__}")
    if not value:
        raise InvalidRecord("empty_field", "'messages' is empty")
    return tuple(_parse_message(m, i) for i, m in enumerate(value))


def _parse_prompt(record: dict) -> tuple[Message, ...]:
    """A prompt is a user string or a conversation that does not end with the assistant."""
    if "prompt" not in record:
        raise InvalidRecord("missing_field", "missing field 'prompt'")
    if isinstance(record["prompt"], list):
        messages = _parse_messages(record["prompt"])
        if messages[-1].role == "assistant":
            raise InvalidRecord("bad_structure", "a prompt conversation must not end with an assistant turn")
        return messages
    return (Message("user", _require_str(record, "prompt", non_empty=True)),)


INT32_LIMIT = 2**31


def _parse_ids(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise InvalidRecord("wrong_type", f"field {field!r} must be a list of integers")
    outside = [t for t in value if not -INT32_LIMIT <= t < INT32_LIMIT]
    if outside:
        raise InvalidRecord("token_out_of_vocab", f"field {field!r} holds {outside[0]}, outside the int32 range")
    if not value:
        raise InvalidRecord("empty_field", f"field {field!r} is empty")
    return tuple(value)


# The fields that mark a record as one kind, and what each kind is called in errors.
KIND_MARKERS = {"sft": ("messages", "completion", "tokens"), "preference": ("chosen", "rejected")}
KIND_NAMES = {
    "sft": "an SFT record ('messages', 'prompt'/'completion' or 'tokens')",
    "preference": "a preference pair ('prompt', 'chosen', 'rejected')",
    "prompt": "a prompt record ('prompt', optional 'answer')",
}


def _refuse_other_kind(record: dict, wanted: str) -> None:
    """A record that carries another kind's marking fields and lacks this kind's is a file of the
    wrong kind for the objective: say so rather than name one missing field."""
    for kind, markers in KIND_MARKERS.items():
        if (
            kind != wanted
            and any(m in record for m in markers)
            and not any(m in record for m in KIND_MARKERS.get(wanted, ()))
        ):
            raise InvalidRecord(
                "wrong_record_kind", f"this is {KIND_NAMES[kind]}, where this source needs {KIND_NAMES[wanted]}"
            )


def parse_sft(value: Any) -> Conversation | Pretokenized:
    record = _require_object(value)
    _refuse_other_kind(record, "sft")
    if "messages" in record:
        messages = _parse_messages(record["messages"])
        if messages[-1].role != "assistant":
            raise InvalidRecord("bad_structure", "a conversation must end with an assistant turn")
        return Conversation(messages)
    if "tokens" in record:
        tokens = _parse_ids(record["tokens"], "tokens")
        mask = _parse_ids(record["loss_mask"], "loss_mask") if "loss_mask" in record else (1,) * len(tokens)
        if len(mask) != len(tokens) or any(m not in (0, 1) for m in mask):
            raise InvalidRecord("wrong_type", "'loss_mask' must be 0/1 values, one per token")
        return Pretokenized(tokens, mask)
    if "prompt" in record or "completion" in record:
        prompt = _require_str(record, "prompt", non_empty=True)
        completion = _require_str(record, "completion", non_empty=True, reason="empty_assistant")
        return Conversation((Message("user", prompt), Message("assistant", completion)))
    raise InvalidRecord("missing_field", "an SFT record needs 'messages', 'prompt'/'completion' or 'tokens'")


REFERENCE_FIELDS = ("ref_chosen_logps", "ref_rejected_logps")


def _reference_logps(record: dict, required: bool) -> tuple[float, float] | None:
    present = [field for field in REFERENCE_FIELDS if field in record]
    if not present and not required:
        return None
    if len(present) != len(REFERENCE_FIELDS):
        missing = [field for field in REFERENCE_FIELDS if field not in record]
        raise InvalidRecord("missing_reference", f"the pair lacks {missing} (write them with score_preferences.py)")
    values = []
    for field in REFERENCE_FIELDS:
        value = record[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value > 0:
            raise InvalidRecord("bad_reference", f"'{field}' must be a finite log-probability (<= 0), got {value!r}")
        values.append(float(value))
    return tuple(values)


def parse_preference(value: Any, require_reference: bool = False) -> PreferencePair:
    """`require_reference`: the pair must carry the reference log-probabilities."""
    record = _require_object(value)
    _refuse_other_kind(record, "preference")
    prompt = _parse_prompt(record)
    chosen = _require_str(record, "chosen", non_empty=True, reason="empty_assistant")
    rejected = _require_str(record, "rejected", non_empty=True, reason="empty_assistant")
    return PreferencePair(prompt, chosen, rejected, _reference_logps(record, require_reference))


def parse_prompt(value: Any) -> PromptRecord:
    record = _require_object(value)
    if "prompt" not in record:
        _refuse_other_kind(record, "prompt")
    prompt = _parse_prompt(record)
    answer = _require_str(record, "answer") if "answer" in record else None
    extra = {k: v for k, v in record.items() if k not in ("prompt", "answer")}
    return PromptRecord(prompt, answer, extra)


PARSERS = {"sft": parse_sft, "preference": parse_preference, "prompt": parse_prompt}
