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


def _rows(**at_row_3: object) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    rows[3] = {**rows[3], **at_row_3}
    return rows


@pytest.mark.parametrize(
    ("column", "value", "kind"),
    [("instruction", {"text": "q"}, "dict"), ("input", ["a", "b"], "list"), ("output", {"label": 1}, "dict")],
)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_nested_value_names_its_column_and_row(
    tmp_path: Path, column: str, value: object, kind: str, suffix: str
) -> None:
    path = tmp_path / f"nested{suffix}"
    rows = _rows(**{column: value})
    path.write_text(json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError) as error:
        load_file(str(path))
    assert str(error.value) == (
        f"task.data-path={str(path)!r}: column {column!r} holds a {kind} in row 4 ({str(value)[:40]!r}); "
        "expected text (or a number) in every row: write it as a string"
    )


def test_numbers_mixed_with_text_become_text(tmp_path: Path) -> None:
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(output=7, instruction=True)))
    dataset = load_file(str(path))
    row = dataset[3]
    assert (row["instruction"], row["output"]) == ("true", "7") and dataset[0]["output"] == "a0"


@pytest.mark.parametrize(
    ("suffix", "text", "where"),
    [
        (
            ".json",
            '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
            "line 2 column 22",
        ),
        (
            ".jsonl",
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n',
            "line 2 column 35",
        ),
        (
            ".jsonl",
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", output: "d"}\n',
            "line 3 column 22",
        ),
    ],
)
def test_bad_json_names_line_and_column(tmp_path: Path, suffix: str, text: str, where: str) -> None:
    path = tmp_path / f"broken{suffix}"
    path.write_text(text)
    with pytest.raises(DataError) as error:
        load_file(str(path))
    (line,) = str(error.value).splitlines()
    assert line.startswith(f"task.data-path={str(path)!r} is not valid JSON: {where}: ")


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("blank.jsonl", b"\n \n", "is an empty file; expected Alpaca-style examples"),
        ("none.json", b"[]", "holds no examples"),
        ("scalar.json", b"42", "holds a JSON int; expected a list of objects or one object per line"),
        (
            "lists.jsonl",
            b'{"instruction": "a", "output": "b"}\n[1, 2]\n',
            "holds a list on line 2; expected one object per line",
        ),
        (
            "latin1.jsonl",
            b'{"instruction": "caf\xe9", "output": "b"}\n',
            "is not UTF-8 text (line 1, byte 20 of the file): save it as UTF-8",
        ),
    ],
)
def test_unusable_json_files_say_why(tmp_path: Path, name: str, data: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as error:
        load_file(str(path))
    assert str(error.value) == f"task.data-path={str(path)!r} {reason}"


def test_more_synthetic_held_out_examples_than_exist(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        held_out(_task(num_train=10, num_eval=5000), seed=0)
    assert str(error.value).startswith("task.num-eval=5000 is more than the synthetic task can hold out (")
    assert str(error.value).endswith("); lower task.num-eval")
