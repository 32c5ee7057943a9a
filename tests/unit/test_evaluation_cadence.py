"""When the server evaluates (eval.every) and the slot that runs one evaluation at a time beside training."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from server_app.evaluation import EvaluationSlot, awaiting_evaluation, evaluated_round


def test_rounds_evaluated_are_round_0_every_kth_and_the_last() -> None:
    assert [r for r in range(6) if evaluated_round(r, 1, 5)] == [0, 1, 2, 3, 4, 5]
    assert [r for r in range(6) if evaluated_round(r, 2, 5)] == [0, 2, 4, 5]
    assert [r for r in range(7) if evaluated_round(r, 3, 6)] == [0, 3, 6]
    assert [r for r in range(4) if evaluated_round(r, 10, 3)] == [0, 3]


def test_a_row_awaits_evaluation_until_its_figures_are_in() -> None:
    assert awaiting_evaluation({"round": 2, "evaluated": True})
    assert not awaiting_evaluation({"round": 2, "evaluated": True, "eval_loss": 1.0, "eval_seconds": 0.1})
    assert not awaiting_evaluation({"round": 3, "evaluated": False})
    assert not awaiting_evaluation({"round": 3, "eval_loss": 1.0})  # a row written before eval.every


class _Recorder:
    """An evaluation that takes a while, notes its thread and how many ran at once."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self.lock = threading.Lock()

    def __call__(self, adapter: Any) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        self.threads.append(threading.get_ident())
        time.sleep(0.05)
        with self.lock:
            self.running -= 1
        return {"eval_loss": float(adapter)}


def test_background_slot_evaluates_in_its_own_thread_one_at_a_time() -> None:
    evaluate = _Recorder()
    slot = EvaluationSlot(evaluate, background=True)
    rows: list[dict[str, Any]] = [{"round": r, "evaluated": True} for r in range(3)]
    slot.start(rows[0], 1.5)  # type: ignore[arg-type]
    assert awaiting_evaluation(rows[0])  # started, not finished: the caller goes on at once
    slot.start(rows[1], 2.5)  # type: ignore[arg-type]  # waits for rows[0] first
    assert not awaiting_evaluation(rows[0]) and rows[0]["eval_loss"] == 1.5
    slot.start(rows[2], 3.5)  # type: ignore[arg-type]
    assert slot.wait() >= 0.0
    slot.close()
    assert [row["eval_loss"] for row in rows] == [1.5, 2.5, 3.5]
    assert all(row["eval_seconds"] >= 0.05 for row in rows)
    assert evaluate.most_at_once == 1 and threading.get_ident() not in evaluate.threads


def test_in_line_slot_evaluates_at_once_in_the_caller() -> None:
    evaluate = _Recorder()
    slot = EvaluationSlot(evaluate, background=False)
    row: dict[str, Any] = {"round": 1, "evaluated": True}
    slot.start(row, 0.5)  # type: ignore[arg-type]
    assert row["eval_loss"] == 0.5 and evaluate.threads == [threading.get_ident()]
    assert slot.wait() == 0.0


def test_an_error_in_the_background_evaluation_is_raised_by_wait() -> None:
    def broken(adapter: Any) -> dict[str, Any]:
        raise RuntimeError("evaluation broke")

    slot = EvaluationSlot(broken, background=True)
    slot.start({"round": 1, "evaluated": True}, None)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="evaluation broke"):
        slot.wait()
    slot.close()
