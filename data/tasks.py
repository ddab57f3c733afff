"""Small tasks whose answers a program can check, for the shipped sample data.

Prompts and answers are a few tokens long so that a ~1M-parameter model at seq_len 256 learns them
in minutes on a CPU, and held-out accuracy shows it: each task is a rule, not a fact to memorise.
"""

import dataclasses
import random
import string


@dataclasses.dataclass(frozen=True)
class TaskSizes:
    """How big task inputs get (inclusive bounds)."""

    max_addend: int = 99
    min_list: int = 3
    max_list: int = 5
    max_digit: int = 9
    min_word: int = 3
    max_word: int = 6


def _word(rng: random.Random, sizes: TaskSizes) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(sizes.min_word, sizes.max_word)))


def add(rng, sizes):
    a, b = rng.randint(0, sizes.max_addend), rng.randint(0, sizes.max_addend)
    return f"add {a} {b}", str(a + b)


def sort(rng, sizes):
    items = [rng.randint(0, sizes.max_digit) for _ in range(rng.randint(sizes.min_list, sizes.max_list))]
    return "sort " + " ".join(map(str, items)), " ".join(map(str, sorted(items)))


def reverse(rng, sizes):
    word = _word(rng, sizes)
    return f"reverse {word}", word[::-1]


def upper(rng, sizes):
    word = _word(rng, sizes)
    return f"upper {word}", word.upper()


TASKS = {"add": add, "sort": sort, "reverse": reverse, "upper": upper}


def sample(rng: random.Random, sizes: TaskSizes = TaskSizes()) -> tuple[str, str, str]:
    """(task name, prompt, answer) of a task drawn uniformly."""
    name = rng.choice(sorted(TASKS))
    prompt, answer = TASKS[name](rng, sizes)
    return name, prompt, answer


def wrong_answer(rng: random.Random, answer: str) -> str:
    """A plausible but wrong answer (for rejected replies): the right one with two characters
    swapped, or one character appended when a swap would change nothing."""
    chars = list(answer)
    i, j = sorted(rng.sample(range(len(chars)), 2)) if len(chars) > 1 else (0, 0)
    chars[i], chars[j] = chars[j], chars[i]
    wrong = "".join(chars)
    return wrong if wrong != answer else answer + answer[-1]
