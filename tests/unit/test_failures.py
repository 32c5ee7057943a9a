"""When a round's replies stop the run, and how a node's error becomes one line."""

from __future__ import annotations

import pytest

from pollen.protocol import error_line
from server_app.failures import round_failure

BAD = "DataError: node config data-path='/x.json' does not exist or is not a file"


def test_every_reply_an_error_stops_with_that_error() -> None:
    assert round_failure("train", 1, 5, [BAD] * 5, 5) == f"round 1: every node failed to train: {BAD}"


def test_most_nodes_with_the_same_error_stop_the_run() -> None:
    reason = round_failure("train", 2, 5, [BAD, BAD, BAD], 5)
    assert reason == f"round 2: 3 of 5 nodes failed to train: {BAD}"


def test_one_failing_node_or_mixed_errors_go_on() -> None:
    assert round_failure("train", 1, 5, [BAD], 5) is None
    assert round_failure("train", 1, 5, ["ValueError: a", "ValueError: b"], 5) is None
    assert round_failure("train", 1, 0, [], 0) is None


def test_no_reply_at_all_stops_the_run() -> None:
    reason = round_failure("evaluate", 3, 4, [], 0)
    assert reason is not None and reason.startswith("round 3: none of the 4 nodes asked to evaluate replied")


@pytest.mark.parametrize(
    "reason",
    [
        BAD,
        "<class 'tasks.data.DataError'>:<'node config data-path='/x.json' does not exist or is not a file'>",
        "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
        'Message: Traceback (most recent call last):\n  File "a.py", line 3, in f\n    g()\n'
        "tasks.data.DataError: node config data-path='/x.json' does not exist or is not a file\n'>",
    ],
)
def test_error_reasons_become_one_line(reason: str) -> None:
    assert error_line(reason) == BAD
