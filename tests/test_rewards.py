"""Reward functions: the registry's lookups and errors, and the shipped checkers on every prompt of
the sample set, right answers against plausible wrong ones (data.tasks.wrong_answer)."""

import json
import random

import pytest

from configs.data import sample_path
from data import tasks
from data.formats import parse_prompt
from trainer import rewards


@pytest.fixture(scope="module")
def prompts():
    with open(sample_path("prompts.jsonl"), encoding="utf-8") as f:
        return [parse_prompt(json.loads(line)) for line in f]


def _record(answer, task="add"):
    return parse_prompt({"prompt": "q", "answer": answer, "task": task})


def test_shipped_names_and_unknown_name():
    assert {"exact_match", "numeric", "sample_tasks"} <= set(rewards.names())
    with pytest.raises(KeyError, match=r"unknown reward function 'exact'; known: \[.*'exact_match'"):
        rewards.get("exact")


def test_register_and_duplicate(monkeypatch):
    monkeypatch.setattr(rewards, "_REGISTRY", dict(rewards._REGISTRY))
    fn = rewards.register("length")(lambda completion, record: float(len(completion)))
    assert rewards.get("length") is fn and rewards.get("length")("abc", _record("1")) == 3.0
    with pytest.raises(ValueError, match="already registered"):
        rewards.register("length")(fn)


@pytest.mark.parametrize("name", ["exact_match", "sample_tasks"])
def test_right_answers_score_one_wrong_ones_zero(prompts, name):
    reward, rng = rewards.get(name), random.Random(0)
    for record in prompts:
        assert reward(record.answer, record) == 1.0
        assert reward(f"  {record.answer}\n", record) == 1.0
        assert reward(tasks.wrong_answer(rng, record.answer), record) == 0.0, record


def test_exact_match_is_exact():
    record = _record("3 4 5", task="sort")
    assert rewards.exact_match("3 4 5", record) == 1.0
    assert rewards.exact_match("3 4 5 ", record) == 1.0
    assert rewards.exact_match("3  4 5", record) == 0.0
    assert rewards.exact_match("The answer is 3 4 5", record) == 0.0


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("147", 1.0),
        ("147.0", 1.0),
        ("+147", 1.0),
        ("1.47e2", 1.0),
        ("The sum is 147.", 1.0),
        ("147 and 5", 1.0),
        ("146", 0.0),
        ("1470", 0.0),
        ("5 then 147", 0.0),
        ("", 0.0),
        ("no number", 0.0),
        ("-147", 0.0),
    ],
)
def test_numeric_reads_the_first_number(reply, expected):
    assert rewards.get("numeric")(reply, _record("147")) == expected


def test_numeric_tolerance_and_signs():
    loose = rewards.numeric_reward(tolerance=0.5)
    assert loose("146.6", _record("147")) == 1.0 and loose("146.4", _record("147")) == 0.0
    assert rewards.get("numeric")("-2.5", _record("-2.50")) == 1.0
    assert rewards.first_number("x .5 y") == 0.5 and rewards.first_number("none") is None


def test_sample_tasks_uses_numbers_for_arithmetic_only():
    assert rewards.sample_tasks("147 apples", _record("147", task="add")) == 1.0
    assert rewards.sample_tasks("ABC!", _record("ABC", task="upper")) == 0.0


def test_records_without_a_usable_answer_are_errors():
    with pytest.raises(ValueError, match="has no 'answer'"):
        rewards.exact_match("3", parse_prompt({"prompt": "add 1 2"}))
    with pytest.raises(ValueError, match="holds no number"):
        rewards.get("numeric")("3", _record("three"))
