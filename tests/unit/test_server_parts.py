"""Server-side pieces: rank assignment, the run folder, byte accounting, progress lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict

from pollen import protocol as P
from pollen.codec import WireSpec, encode
from server_app.artifacts import RunFolder, check_run_folder_free, run_folder_path, write_atomic
from server_app.nodes import NodeInfo, assign_rank, parse_info
from server_app.rounds import _bytes, _bytes_fp32, progress_line


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _info(partition: int, requested: int = 0) -> NodeInfo:
    return NodeInfo(
        node_id=7,
        partition_id=partition,
        requested_rank=requested,
        fingerprint="f",
        quantization="4bit",
        device="cpu",
    )


def test_rank_comes_from_node_then_plan_then_default() -> None:
    assert assign_rank(_info(3, requested=32), (2, 4), 8) == 32
    assert [assign_rank(_info(p), (2, 4, 16), 8) for p in range(5)] == [2, 4, 16, 2, 4]
    assert assign_rank(_info(3), (), 8) == 8


def test_handshake_reply_is_parsed_or_refused() -> None:
    query = Message(RecordDict({P.CONFIG: ConfigRecord({})}), dst_node_id=7, message_type="query")
    meta = ConfigRecord(
        {P.RANK: 0, P.PARTITION_ID: 2, P.FINGERPRINT: "f", P.QUANTIZATION: "4bit", P.DEVICE: "cpu"}
    )
    info = parse_info(7, Message(RecordDict({P.META: meta}), reply_to=query))
    assert (info.partition_id, info.requested_rank) == (2, 0)
    with pytest.raises(ValueError, match="malformed"):
        parse_info(7, Message(RecordDict({P.META: ConfigRecord({P.RANK: 0})}), reply_to=query))


def test_run_folder_writes_config_metrics_and_refuses_reuse(tmp_path: Path) -> None:
    path = run_folder_path(str(tmp_path), "r1")
    check_run_folder_free(path)
    folder = RunFolder(path)
    folder.create({"a": 1})
    folder.append_metrics({"round": 1, "eval_loss": 2.0})
    folder.append_metrics({"round": 2, "eval_loss": 1.5})
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2]
    assert json.loads((path / "run_config.json").read_text()) == {"a": 1}
    assert not list(path.glob(".*.tmp"))
    with pytest.raises(FileExistsError, match="already holds a run"):
        check_run_folder_free(path)


def test_timestamp_name_when_run_name_is_empty(tmp_path: Path) -> None:
    assert len(run_folder_path(str(tmp_path), "").name) == len("20260101-120000")


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    write_atomic(target, b"old")
    write_atomic(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


def test_bytes_are_measured_and_fp32_equivalent_is_larger_for_4bit() -> None:
    tensors = {f"m{i}.A": torch.randn(8, 128) for i in range(4)}
    four = encode(tensors, WireSpec(bits=4))
    message = Message(
        RecordDict({P.ADAPTER: four, P.CONFIG: ConfigRecord({P.RANK: 8})}),
        dst_node_id=1,
        message_type="train",
    )
    sent, fp32 = _bytes([message]), _bytes_fp32([message])
    assert 0 < sent < 0.2 * fp32
    plain = Message(
        RecordDict({P.ADAPTER: encode(tensors, WireSpec(bits=32)), P.CONFIG: ConfigRecord({P.RANK: 8})}),
        dst_node_id=1,
        message_type="train",
    )
    assert _bytes([plain]) == _bytes_fp32([plain]) == fp32


def test_progress_line_shows_the_figures() -> None:
    row = {
        "round": 2,
        "eval_loss": 1.23456,
        "exact_match": 0.5,
        "train_loss": None,
        "lr": 0.0015,
        "nodes_accepted": 3,
        "nodes_sent": 4,
        "uplink_bytes": 1_000_000,
        "uplink_bytes_fp32": 7_000_000,
        "downlink_bytes": 2_000_000,
        "downlink_bytes_fp32": 2_000_000,
        "round_seconds": 12.34,
    }
    line = progress_line(row, 5)
    assert line.startswith(
        "round 2/5 | eval_loss 1.2346 | exact_match 0.500 | train_loss n/a | lr 1.50e-03 | nodes 3/4"
    )
    assert "up 1.000 MB (0.14x fp32)" in line and "down 2.000 MB (1.00x fp32)" in line and "12.3 s" in line


def test_config_and_registry_name_the_same_strategies() -> None:
    from pollen.config import STRATEGIES
    from strategies.registry import STRATEGY_CLASSES

    assert list(STRATEGIES) == list(STRATEGY_CLASSES)


def test_mixed_rank_plan_needs_a_strategy_that_mixes_ranks(run_config: dict) -> None:
    from pollen.config import parse_run_config
    from server_app.preflight import check_strategy_ranks

    mixed = {**run_config, "strategy.rank-plan": "2,8"}
    (problem,) = check_strategy_ranks(parse_run_config({**mixed, "strategy.name": "fedavg"}))
    assert "strategy.rank-plan='2,8' mixes ranks" in problem and "'zeropad'" in problem
    assert check_strategy_ranks(parse_run_config({**mixed, "strategy.name": "flora"})) == []
    same = {**run_config, "strategy.rank-plan": str(run_config["lora.rank"])}
    assert check_strategy_ranks(parse_run_config({**same, "strategy.name": "fedavg"})) == []
