"""Deterministic synthetic instruction data: short Alpaca-format tasks whose answers are checkable exactly.

This is Pollen's offline default dataset. Every skill has a one-line exact answer, so exact match is a
meaningful metric and a tiny base model can learn the format in a few hundred LoRA steps.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import datasets

SKILLS: tuple[str, ...] = ("add", "subtract", "reverse", "sort", "lookup")
COLUMNS: tuple[str, ...] = ("instruction", "input", "output", "skill")

# A few phrasings per skill, so the instruction is read rather than memorised as one constant string.
# "{key}" is filled with the key asked for (lookup only).
PHRASINGS: dict[str, tuple[str, ...]] = {
    "add": ("Add the two numbers.", "What is the sum?", "Compute the sum."),
    "subtract": ("Subtract the second number.", "What is the difference?", "Compute the difference."),
    "reverse": ("Reverse the letters.", "Write the word backwards.", "Spell it in reverse."),
    "sort": ("Sort the digits.", "Sort these in ascending order.", "Order the digits from low to high."),
    "lookup": ("Find the value of {key}.", "What is {key} set to?", "Look up {key}."),
}

MAX_OPERAND = 19  # add/subtract operands are 0..19: small enough for a ~1M-parameter model to know
_MAX_ATTEMPTS = 1000  # draws per example before giving up on finding a new distinct problem


@dataclass(frozen=True)
class Problem:
    """One task instance without its wording: ``data`` is the input text, ``key`` the looked-up key."""

    skill: str
    data: str
    answer: str
    key: str = ""


def _draw_add(rng: random.Random) -> Problem:
    a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
    return Problem("add", f"{a} + {b}", str(a + b))


def _draw_subtract(rng: random.Random) -> Problem:
    a = rng.randint(0, MAX_OPERAND)
    b = rng.randint(0, a)
    return Problem("subtract", f"{a} - {b}", str(a - b))


def _draw_reverse(rng: random.Random) -> Problem:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 4)))
    return Problem("reverse", word, word[::-1])


def _draw_sort(rng: random.Random) -> Problem:
    digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 5))]
    return Problem("sort", " ".join(digits), " ".join(sorted(digits)))


def _draw_lookup(rng: random.Random) -> Problem:
    keys = rng.sample(string.ascii_lowercase, 3)
    values = {k: rng.choice(string.digits) for k in keys}
    key = rng.choice(keys)
    data = ", ".join(f"{k}={v}" for k, v in values.items())
    return Problem("lookup", data, values[key], key)


_DRAWERS: dict[str, Callable[[random.Random], Problem]] = {
    "add": _draw_add,
    "subtract": _draw_subtract,
    "reverse": _draw_reverse,
    "sort": _draw_sort,
    "lookup": _draw_lookup,
}


def draw_problem(skill: str, rng: random.Random) -> Problem:
    """A random problem of one skill; the base-model builder renders these in non-instruction formats."""
    return _DRAWERS[skill](rng)


def to_example(problem: Problem, rng: random.Random) -> dict[str, str]:
    """The Alpaca-format row of a problem, with a randomly chosen instruction phrasing."""
    instruction = rng.choice(PHRASINGS[problem.skill]).format(key=problem.key)
    return {
        "instruction": instruction,
        "input": problem.data,
        "output": problem.answer,
        "skill": problem.skill,
    }


def _check_skills(skills: Sequence[str]) -> None:
    unknown = [s for s in skills if s not in _DRAWERS]
    if not skills or unknown:
        raise ValueError(
            f"skills must be a non-empty selection of {list(SKILLS)}; got {list(skills)} (unknown: {unknown})"
        )


def _draw_examples(
    count: int, rng: random.Random, skills: Sequence[str], exclude: set[Problem], distinct: bool
) -> tuple[list[dict[str, str]], set[Problem]]:
    """``count`` examples cycling through ``skills`` (balanced), avoiding problems in ``exclude``.

    With ``distinct`` no problem repeats. Returns the shuffled examples and the problems drawn.
    """
    if count < 0:
        raise ValueError(f"the number of examples must be >= 0; got {count}")
    _check_skills(skills)
    examples: list[dict[str, str]] = []
    drawn: set[Problem] = set()
    for index in range(count):
        skill = skills[index % len(skills)]
        for _ in range(_MAX_ATTEMPTS):
            problem = draw_problem(skill, rng)
            if problem not in exclude and not (distinct and problem in drawn):
                break
        else:
            raise ValueError(
                f"could not draw a new '{skill}' problem after {_MAX_ATTEMPTS} tries: the skill has too few "
                f"distinct problems for {count} examples; ask for fewer examples"
            )
        drawn.add(problem)
        examples.append(to_example(problem, rng))
    rng.shuffle(examples)
    return examples, drawn


def make_examples(count: int, seed: int, skills: Sequence[str] = SKILLS) -> list[dict[str, str]]:
    """``count`` examples balanced over ``skills`` (counts differ by at most one), determined by ``seed``."""
    examples, _ = _draw_examples(count, random.Random(seed), skills, exclude=set(), distinct=False)
    return examples


def _to_dataset(examples: list[dict[str, str]]) -> datasets.Dataset:
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    columns = {name: [e[name] for e in examples] for name in COLUMNS}
    return datasets.Dataset.from_dict(columns, features=features)


def synthetic_splits(num_train: int, num_test: int, seed: int) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Train and test sets over all skills; no test problem (hence no test prompt) appears in train.

    Test problems are distinct from each other, so exact match is not dominated by repeats.
    """
    rng = random.Random(seed)
    test, test_problems = _draw_examples(num_test, rng, SKILLS, exclude=set(), distinct=True)
    train, _ = _draw_examples(num_train, rng, SKILLS, exclude=test_problems, distinct=False)
    return _to_dataset(train), _to_dataset(test)
