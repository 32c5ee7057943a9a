"""Local Alpaca-style files in every accepted format, column aliases, partitioning, clear errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from pollen.config import TaskConfig
from tasks.data import DataError, check_data_source, held_out, load_file, node_data

ROWS = [
    {
        "instruction": f"Say the number {i}.",
        "input": "" if i % 2 else f"n={i}",
        "output": str(i),
        "skill": f"s{i % 3}",
    }
    for i in range(60)
]


def _task(path: str = "", **changes: object) -> TaskConfig:
    base = TaskConfig(
        name="synthetic",
        data_path=path,
        partitioner="iid",
        alpha=0.5,
        partition_by="skill",
        num_train=200,
        num_eval=10,
        max_new_tokens=4,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def _write(tmp_path: Path, fmt: str) -> Path:
    path = tmp_path / f"data.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in ROWS))
    elif fmt == "csv":
        pd.DataFrame(ROWS).to_csv(path, index=False)
    else:
        pd.DataFrame(ROWS).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "parquet"])
def test_every_local_format_loads_as_alpaca(tmp_path: Path, fmt: str) -> None:
    dataset = load_file(str(_write(tmp_path, fmt)))
    assert len(dataset) == len(ROWS)
    assert {"instruction", "input", "output"} <= set(dataset.column_names)
    assert dataset[3]["output"] == "3" and isinstance(dataset[0]["input"], str)


def test_aliases_are_renamed_and_input_is_added(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(5)))
    dataset = load_file(str(path))
    assert dataset[2] == {"instruction": "q2", "output": "a2", "input": ""}


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "hello"}))
    with pytest.raises(DataError, match=r"needs \['instruction', 'output'\]"):
        load_file(str(path))


def test_missing_file_and_bad_extension_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        check_data_source(_task(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r"expected one of \.json, \.jsonl, \.csv, \.parquet"):
        check_data_source(_task(str(tmp_path / "data.txt")))


def test_file_partitions_cover_the_pool_without_the_held_out_set(tmp_path: Path) -> None:
    task = _task(str(_write(tmp_path, "jsonl")), name="mine-a")
    evaluation = {r["output"] for r in held_out(task, seed=1)}
    seen: set[str] = set()
    for pid in range(3):
        train, local_eval = node_data(task, pid, 3, seed=1)
        outputs = {r["output"] for r in train} | {r["output"] for r in local_eval}
        assert not outputs & evaluation
        assert not outputs & seen
        seen |= outputs
    assert len(seen) + len(evaluation) == len(ROWS)


def test_dirichlet_needs_the_partition_column(tmp_path: Path) -> None:
    task = _task(str(_write(tmp_path, "csv")), name="mine-b", partitioner="dirichlet", partition_by="domain")
    with pytest.raises(DataError, match="task.partition-by='domain' is not a column"):
        node_data(task, 0, 2, seed=0)


def test_synthetic_dirichlet_partitions_are_non_iid() -> None:
    task = _task(partitioner="dirichlet", alpha=0.3, num_train=1000, num_eval=20)
    shares = []
    for pid in range(5):
        train, _ = node_data(task, pid, 5, seed=0)
        skills = train["skill"]
        shares.append(max(skills.count(s) for s in set(skills)) / len(skills))
    assert max(shares) > 0.5  # some node is dominated by one skill


def test_node_file_replaces_the_partition(tmp_path: Path) -> None:
    path = _write(tmp_path, "parquet")
    train, local_eval = node_data(_task(), 0, 10, seed=0, data_path=str(path))
    assert len(train) + len(local_eval) == len(ROWS)
