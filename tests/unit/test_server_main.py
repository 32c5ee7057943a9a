"""The real ServerApp main loop against real ClientApp handlers, in one process (no Flower transport).

Covers what a broken federation must do: stop in round 1 with the nodes' own error line and a failed
run folder, rather than run every round on nothing; and stop before round 1 when no node can join.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

from client_app.app import app as client_app
from pollen import protocol as P
from pollen.codec import WireSpec, decode, encode
from server_app.app import main

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


class InProcessGrid:
    """Delivers every message to the real ClientApp with a per-node Context, and returns its reply."""

    def __init__(self, run_config: dict[str, Any], node_configs: dict[int, dict[str, Any]]) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config=run_config)
            for node, cfg in node_configs.items()
        }
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> Iterator[Message]:
        for message in messages:
            self.sent.append(message.metadata.message_type)
            yield client_app(message, self.contexts[message.metadata.dst_node_id])


def _run(run_config: dict[str, Any], node_configs: dict[int, dict[str, Any]]) -> tuple[int, InProcessGrid]:
    grid = InProcessGrid(run_config, node_configs)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(SystemExit) as stopped:
        main(cast(Grid, grid), context)
    return int(stopped.value.code or 0), grid


def _small(run_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return {
        **run_config,
        "num-server-rounds": 4,
        "train.local-steps": 1,
        "task.num-train": 60,
        "task.num-eval": 4,
        "task.max-new-tokens": 2,
        "strategy.fraction-train": 1.0,
        "strategy.fraction-evaluate": 0.0,
        "strategy.round-timeout": 30.0,
        "output.dir": str(tmp_path / "out"),
        "output.run-name": "broken",
    }


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The ERROR lines of Pollen's logger during the test (it does not propagate to the root logger)."""
    handler = _Lines()
    logging.getLogger("pollen").addHandler(handler)
    yield handler.lines
    logging.getLogger("pollen").removeHandler(handler)


def test_every_node_failing_in_round_1_stops_the_run_with_their_error(
    run_config: dict[str, Any], tmp_path: Path, errors: list[str]
) -> None:
    missing = str(tmp_path / "institution.jsonl")  # each institution points at a file it does not have
    nodes = {11: {"data-path": missing}, 12: {"data-path": missing}}
    code, grid = _run(_small(run_config, tmp_path), nodes)
    assert code == 1
    assert grid.sent.count("train") == 2  # round 1 only, never rounds 2-4
    expected = (
        f"round 1: every node failed to train: DataError: node config data-path={missing!r} does not exist"
    )
    assert any(expected in line for line in errors), errors
    assert not any("Traceback" in line for line in errors)
    run_dir = tmp_path / "out" / "broken"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["round"] == 1 and "DataError" in status["reason"]
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "adapter").exists()


def test_one_failing_node_only_drops_that_node(run_config: dict[str, Any], tmp_path: Path) -> None:
    bad: dict[str, Any] = {"data-path": str(tmp_path / "missing.jsonl")}
    nodes = {
        11: bad,
        12: {"partition-id": 0, "num-partitions": 2},
        13: {"partition-id": 1, "num-partitions": 2},
    }
    config = {**_small(run_config, tmp_path), "num-server-rounds": 1, "output.run-name": "one-bad"}
    grid = InProcessGrid(config, nodes)
    main(
        cast(Grid, grid), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    )
    run_dir = tmp_path / "out" / "one-bad"
    (row,) = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (row["nodes_sent"], row["nodes_accepted"], row["nodes_rejected"]) == (3, 2, 1)
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert isinstance(row["eval_loss"], float) and row["metric"] == "exact"


def test_no_node_able_to_join_stops_before_anything_is_written(
    run_config: dict[str, Any], tmp_path: Path, errors: list[str]
) -> None:
    nodes = {11: {"lora-rank": -3}, 12: {"lora-rank": -3}}  # every node misconfigured
    code, grid = _run(_small(run_config, tmp_path), nodes)
    assert code == 1 and "train" not in grid.sent
    assert any("no node could join (2 of 2 refused)" in line and "lora-rank=-3" in line for line in errors)
    assert not (tmp_path / "out").exists()


class _CutGrid(InProcessGrid):
    """An InProcessGrid whose ServerApp is stopped (as by a crash) when it sends round ``cut``'s training."""

    def __init__(self, run_config: dict[str, Any], node_configs: dict[int, dict[str, Any]], cut: int) -> None:
        super().__init__(run_config, node_configs)
        self.cut = cut
        self.train_configs: list[dict[str, Any]] = []

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> Iterator[Message]:
        messages = list(messages)
        train = [
            dict(m.content.config_records["config"]) for m in messages if m.metadata.message_type == "train"
        ]
        if train and train[0]["server-round"] == self.cut:
            raise KeyboardInterrupt("the server was stopped")
        self.train_configs += train
        return super().send_and_receive(messages, timeout)


def _serve(grid: InProcessGrid, config: dict[str, Any]) -> None:
    main(
        cast(Grid, grid), Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    )


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    keys = ("round", "eval_loss", "exact_match", "train_loss", "lr", "uplink_bytes", "downlink_bytes")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: row.get(k) for k in keys} for row in rows]


NODES = {11: {"partition-id": 0, "num-partitions": 2}, 12: {"partition-id": 1, "num-partitions": 2}}


def _resumable(run_config: dict[str, Any], tmp_path: Path, **wire: Any) -> dict[str, Any]:
    return {**_small(run_config, tmp_path), "num-server-rounds": 3, "train.local-steps": 2, **wire}


@pytest.mark.parametrize(("uplink", "downlink"), [(32, 32), (4, 32), (4, 4)])
def test_a_resumed_run_continues_equal_to_an_uninterrupted_one(
    run_config: dict[str, Any], tmp_path: Path, uplink: int, downlink: int
) -> None:
    """Error feedback off: nothing lives only on the nodes, so resuming loses nothing. With a 4-bit
    downlink every message is a whole adapter rounded with the server's generator, which is restored."""
    from safetensors.torch import load_file

    wire = {"wire.error-feedback": False, "wire.uplink-bits": uplink, "wire.downlink-bits": downlink}
    config = _resumable(run_config, tmp_path, **wire)
    _serve(InProcessGrid(config, NODES), {**config, "output.run-name": "whole"})
    cut = {**config, "output.run-name": "cut"}
    with pytest.raises(KeyboardInterrupt):
        _serve(_CutGrid(cut, NODES, cut=3), cut)
    assert json.loads((tmp_path / "out" / "cut" / "status.json").read_text())["status"] == "failed"
    resumed = {**cut, "output.resume": True}
    _serve(InProcessGrid(resumed, NODES), resumed)  # a new Flower run: fresh node state

    whole, again = tmp_path / "out" / "whole", tmp_path / "out" / "cut"
    assert _rows(again) == _rows(whole) and len(_rows(whole)) == 3
    left = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    right = load_file(str(again / "adapter" / "adapter_model.safetensors"))
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)


def test_a_resumed_run_restarts_node_state_cleanly(run_config: dict[str, Any], tmp_path: Path) -> None:
    """Error feedback on, 4-bit downlink: views and residuals lived on the nodes; the resumed run starts
    them afresh (whole adapters first) instead of sending changes to a view no node holds."""
    config = _resumable(run_config, tmp_path, **{"wire.error-feedback": True, "wire.downlink-bits": 4})
    with pytest.raises(KeyboardInterrupt):
        _serve(_CutGrid(config, NODES, cut=3), config)
    resumed = {**config, "output.resume": True}
    grid = _CutGrid(resumed, NODES, cut=99)
    _serve(grid, resumed)
    (row3,) = [r for r in _rows(tmp_path / "out" / "broken") if r["round"] == 3]
    assert [c["downlink-base"] for c in grid.train_configs] == [-1, -1]  # whole adapters, version 1
    assert [c["downlink-version"] for c in grid.train_configs] == [1, 1]
    assert isinstance(row3["eval_loss"], float)
    rows = [
        json.loads(line) for line in (tmp_path / "out" / "broken" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["nodes_accepted"] == 2 and rows[-1]["nodes_rejected"] == 0


class _HostileGrid(InProcessGrid):
    """Node 12 answers every train message with finite but huge values, encoded at the run's wire spec."""

    def __init__(self, run_config: dict[str, Any], node_configs: dict[int, dict[str, Any]], value: float):
        super().__init__(run_config, node_configs)
        self.value = value
        self.spec = WireSpec(
            bits=run_config["wire.uplink-bits"],
            scheme=run_config["wire.scheme"],
            block_size=run_config["wire.block-size"],
        )

    def send_and_receive(
        self, messages: Iterable[Message], timeout: float | None = None
    ) -> Iterator[Message]:
        for reply in super().send_and_receive(messages, timeout):
            if (
                reply.metadata.src_node_id == 12
                and not reply.has_error()
                and P.DELTA in reply.content.array_records
            ):
                honest = decode(reply.content.array_records[P.DELTA])
                huge = {name: torch.full_like(t, self.value) for name, t in honest.items()}
                reply.content[P.DELTA] = encode(huge, self.spec)
            yield reply


@pytest.mark.parametrize(
    ("strategy", "value"),
    [
        ("fedavg", 1e30),
        ("zeropad", 1e30),
        ("flora", 1e30),
        ("flexlora", 1e30),
        ("ffa", 1e30),
        ("flexlora", 3.3e38),
        ("ffa", 3.3e38),
    ],
)
def test_a_node_sending_huge_updates_is_rejected_every_round_and_the_run_finishes(
    run_config: dict[str, Any], tmp_path: Path, strategy: str, value: float
) -> None:
    config = {
        **_small(run_config, tmp_path),
        "num-server-rounds": 2,
        "eval.every": 1,  # each round's global adapter is scored: finite after every rejection
        "strategy.name": strategy,
        "strategy.rank-plan": "" if strategy == "fedavg" else "4,8",
        "output.run-name": f"hostile-{strategy}",
    }
    warnings = _Lines()
    warnings.setLevel(logging.WARNING)
    logging.getLogger("pollen").addHandler(warnings)
    try:
        _serve(_HostileGrid(config, NODES, value), config)
    finally:
        logging.getLogger("pollen").removeHandler(warnings)
    run_dir = tmp_path / "out" / f"hostile-{strategy}"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["nodes_accepted"], r["nodes_rejected"]) for r in rows] == [(1, 1), (1, 1)]
    assert all(math.isfinite(r["eval_loss"]) for r in rows)
    rejected = [line for line in warnings.lines if "rejected the update of node 12" in line]
    assert len(rejected) == 2 and all("max-update-ratio" in line for line in rejected), warnings.lines
    from safetensors.torch import load_file

    final = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in final.values())
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"


def test_evaluation_every_second_round_in_the_background_writes_every_round_in_order(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    """eval.every=2 over 5 rounds: rounds 2, 4 and 5 (the last) are evaluated, centrally and on the nodes;
    every round has its row, in order; evaluating in a thread finds the same figures as in line."""
    rows = {}
    for background in (True, False):
        name = f"bg-{background}".lower()
        config = {
            **_small(run_config, tmp_path),
            "num-server-rounds": 5,
            "strategy.fraction-evaluate": 1.0,
            "eval.every": 2,
            "eval.background": background,
            "output.run-name": name,
        }
        grid = InProcessGrid(config, NODES)
        _serve(grid, config)
        assert grid.sent.count("evaluate") == 3 * len(NODES)  # rounds 2, 4, 5 only
        lines = (tmp_path / "out" / name / "metrics.jsonl").read_text().splitlines()
        rows[background] = [json.loads(line) for line in lines]
    for row in rows[True]:
        assert row["evaluated"] == (row["round"] in (2, 4, 5))
        assert ("eval_loss" in row) == row["evaluated"] == ("federated_eval_loss" in row)
        assert ("eval_seconds" in row) == row["evaluated"]
    assert [r["round"] for r in rows[True]] == [1, 2, 3, 4, 5]
    figures = ("round", "evaluated", "eval_loss", "exact_match", "federated_eval_loss", "train_loss")
    assert [{k: r.get(k) for k in figures} for r in rows[True]] == [
        {k: r.get(k) for k in figures} for r in rows[False]
    ]
