"""Scoring rules for label and choice tasks, and the metric `auto` picks."""

from __future__ import annotations

import pytest

from tasks.evaluation import generation_score
from tasks.metrics import (
    check_metric,
    choice_letter,
    choose_metric,
    label_set,
    majority_baseline,
    named_label,
    score,
)

LABELS = ["positive", "negative", "neutral"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("b.", "B"),
        ("(C)", "C"),
        ("The answer is B", "B"),
        ("the answer is (d) because", "D"),
        ("Answer: e", "E"),
        ("C) 14", "C"),
        ("I would pick option A here", "A"),
        ("It must be D.", "D"),
        ("a dog", None),
        ("no idea", None),
    ],
)
def test_choice_letter_is_found_where_answers_put_it(text: str, letter: str | None) -> None:
    assert choice_letter(text) == letter


@pytest.mark.parametrize(
    ("text", "label"),
    [
        ("positive", "positive"),
        ("Positive.", "positive"),
        ("The sentiment is NEGATIVE", "negative"),
        ("neutral, not positive", "neutral"),
        ("nonpositive", None),
        ("", None),
    ],
)
def test_named_label_is_the_first_label_said(text: str, label: str | None) -> None:
    assert named_label(text, LABELS) == label


def test_score_by_metric() -> None:
    assert score("exact", " 12 ", "12") and not score("exact", "12.", "12")
    assert score("label", "Positive!", "positive", LABELS)
    assert not score("label", "negative", "positive", LABELS)
    assert not score("label", "positive", "positive")  # no label set, nothing can be named
    assert score("choice", "The answer is b", "B") and not score("choice", "A", "B")
    assert not score("label", "I cannot tell", "positive", LABELS)
    with pytest.raises(ValueError, match="scores no generation"):
        score("loss", "x", "y")


def test_auto_picks_choice_label_or_exact() -> None:
    assert choose_metric(["A", "c", "(B)", "D."]) == "choice"
    assert choose_metric(["positive", "negative", "neutral", "positive"] * 5) == "label"
    assert choose_metric([str(n) for n in range(40)]) == "exact"
    assert choose_metric(["a long free text answer of many words"] * 2 + ["another"] * 2) == "exact"


def test_label_set_and_majority_baseline() -> None:
    refs = ["Positive", "negative", "positive", "neutral", "positive "]
    assert label_set(refs) == ["positive", "negative", "neutral"]
    assert majority_baseline(refs) == pytest.approx(3 / 5)
    assert majority_baseline([]) is None


def test_a_figure_from_zero_examples_is_absent_not_zero() -> None:
    assert generation_score("exact", [], []) is None
    assert generation_score("label", ["positive", "no"], ["positive", "negative"], LABELS) == 0.5


def test_choice_metric_refuses_outputs_without_letters() -> None:
    with pytest.raises(ValueError, match="name no option letter"):
        check_metric("choice", ["positive", "B"])
    check_metric("choice", ["B", "The answer is C"])
