"""The per-round learning rate: constant, or cosine from train.lr down to train.lr-min."""

from __future__ import annotations

import math

import pytest

from pollen.schedule import round_lr


def test_constant_is_the_same_every_round() -> None:
    assert {round_lr("constant", 0.003, 0.0003, r, 10) for r in range(1, 11)} == {0.003}


def test_cosine_starts_at_lr_ends_at_lr_min_and_halves_midway() -> None:
    rates = [round_lr("cosine", 0.003, 0.0003, r, 11) for r in range(1, 12)]
    assert rates[0] == pytest.approx(0.003) and rates[-1] == pytest.approx(0.0003)
    assert rates[5] == pytest.approx((0.003 + 0.0003) / 2)
    assert all(later < earlier for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[2] == pytest.approx(0.0003 + 0.0027 * 0.5 * (1 + math.cos(math.pi * 0.2)))


def test_cosine_holds_lr_min_past_the_last_round_and_lr_for_a_single_round() -> None:
    assert round_lr("cosine", 0.003, 0.0003, 14, 10) == pytest.approx(0.0003)
    assert round_lr("cosine", 0.003, 0.0003, 1, 1) == 0.003


@pytest.mark.parametrize(
    ("schedule", "server_round", "fragment"),
    [("linear", 1, "schedule='linear'"), ("cosine", 0, "server_round=0")],
)
def test_bad_arguments_are_named(schedule: str, server_round: int, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        round_lr(schedule, 0.003, 0.0, server_round, 5)
