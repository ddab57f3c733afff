"""Reward functions for GRPO, by name: `fn(completion_text, record) -> float`.

`completion_text` is the reply as a user would read it: decoded, cut before the end-of-reply marker,
with a thinking template only the answer after `</think>`, and stripped
(data.evaluation.completion_text). `record` is the prompt's `data.formats.PromptRecord`:
its `answer` and `extra` fields (e.g. the sample tasks' "task") are what a checker compares against.
A config names its reward function; `get` turns the name into the function, so adding one is a
`@register("name")` away and a typo fails at start-up with the list of known names.

Shipped checkers, for the sample tasks of data/tasks.py (data/sample/prompts.jsonl):
- "exact_match": 1 when the reply equals the answer (surrounding whitespace ignored), else 0;
- "numeric": 1 when the first number in the reply is within tolerance of the answer's number;
- "sample_tasks": "numeric" for the arithmetic task ("add"), "exact_match" for the others.
"""

import math
import re
from typing import Callable

from data.formats import PromptRecord

RewardFn = Callable[[str, PromptRecord], float]

# An optionally signed integer or decimal, with an optional exponent: "147", "-3.5", "+2", "1e3", ".5".
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
# Answers of the sample tasks are integers, so any float noise in a reply's number is far below this;
# a checker for other tasks registers its own tolerance with `numeric_reward`.
NUMERIC_TOLERANCE = 1e-6
ARITHMETIC_TASKS = ("add",)

_REGISTRY: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function under `name` (a name is taken once)."""

    def add(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY:
            raise ValueError(f"a reward function named {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def get(name: str) -> RewardFn:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward function {name!r}; known: {names()}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


def _answer(record: PromptRecord) -> str:
    if record.answer is None:
        raise ValueError(f"the prompt {record.prompt[-1].content!r} has no 'answer' to check a reply against")
    return record.answer


def first_number(text: str) -> float | None:
    """The first number written in `text`, or None."""
    match = NUMBER.search(text)
    return float(match.group()) if match else None


@register("exact_match")
def exact_match(completion: str, record: PromptRecord) -> float:
    return float(completion.strip() == _answer(record).strip())


def numeric_reward(tolerance: float) -> RewardFn:
    """A checker: 1 when the first number of the reply is within `tolerance` (absolute) of the first
    number of the answer, 0 when it is not or the reply has none."""

    def check(completion: str, record: PromptRecord) -> float:
        expected = first_number(_answer(record))
        if expected is None:
            raise ValueError(f"the answer {record.answer!r} holds no number to compare with")
        got = first_number(completion)
        return float(got is not None and math.isclose(got, expected, rel_tol=0.0, abs_tol=tolerance))

    return check


register("numeric")(numeric_reward(NUMERIC_TOLERANCE))


@register("sample_tasks")
def sample_tasks(completion: str, record: PromptRecord) -> float:
    """The sample tasks' own rule: arithmetic replies are numbers, the rest are strings."""
    checker = get("numeric") if record.extra.get("task") in ARITHMETIC_TASKS else exact_match
    return checker(completion, record)
