"""A user's own data file: every failure seen in the field stops in the server's preflight with one line,
and what passes trains on every example (responses are kept, prompts are cut)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pollen.config import ConfigError, TaskConfig
from pollen.model import load_tokenizer
from server_app.preflight import preflight
from tasks.checks import check_partitions, check_task_data
from tasks.data import DataError, held_out, load_file, load_pool
from tasks.embedded import embedded_model_dir
from tasks.prompts import ALPACA
from tests.datafiles import choice_rows, label_rows, write_json


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(str(embedded_model_dir()))


def _task(path: Path, **changes: Any) -> TaskConfig:
    task = TaskConfig(
        name="synthetic",
        data_path=str(path),
        partitioner="iid",
        alpha=0.5,
        partition_by="skill",
        num_train=100,
        num_eval=40,
        max_new_tokens=4,
    )
    return replace(task, **changes)


def test_the_field_failure_stops_in_preflight_with_one_line(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    """The shipped config (Dirichlet over 'skill') on a classification file without that column."""
    path = write_json(tmp_path / "their.json", label_rows(600))
    config = {**run_config, "task.data-path": str(path), "output.dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError) as error:
        preflight(config)
    assert error.value.problems == [
        "task.partition-by='skill' is not a column of the data (columns: instruction, input, output); "
        "name one of them or set task.partitioner='iid'"
    ]
    assert not (tmp_path / "out").exists()


def test_long_prompts_keep_their_responses_and_are_counted(tokenizer: Any, tmp_path: Path) -> None:
    """~250-character reviews at 128 tokens of a byte-level tokenizer: the input's start is cut."""
    task = _task(write_json(tmp_path / "reviews.json", label_rows(300)))
    check = check_task_data(task, 0, tokenizer, 128, ALPACA)
    assert check.problems == []
    assert check.pool.prompt_cut == check.pool.checked == 260 and check.held_out.prompt_cut == 40
    assert check.pool.lost == check.held_out.lost == check.pool.response_cut == 0
    (note,) = check.notes
    assert "260 of 260 training and 40 of 40 held-out examples are longer" in note
    longest = max(check.pool.longest, check.held_out.longest)
    assert 250 < longest and f"train.max-seq-len={longest} fits every example" in note


def test_a_template_longer_than_max_seq_len_is_an_error_naming_a_length(
    tokenizer: Any, tmp_path: Path
) -> None:
    task = _task(write_json(tmp_path / "reviews.json", label_rows(100)))
    check = check_task_data(task, 0, tokenizer, 24, ALPACA)  # the Alpaca markers alone take 33 tokens
    held, pool = check.problems
    assert held.startswith("train.max-seq-len=24 leaves 40 of 40 held-out examples no response token")
    assert pool.startswith("train.max-seq-len=24 leaves 60 of 60 training examples no response token")
    assert held.endswith(
        f"train.max-seq-len={max(check.pool.longest, check.held_out.longest)} fits every example"
    )


def test_label_outputs_choose_label_accuracy_with_a_majority_baseline(tokenizer: Any, tmp_path: Path) -> None:
    task = _task(write_json(tmp_path / "reviews.json", label_rows(400, skew=0.6)))
    check = check_task_data(task, 0, tokenizer, 512, ALPACA)
    assert (check.metric, set(check.labels)) == ("label", {"positive", "negative", "neutral"})
    references = [r["output"] for r in held_out(task, 0)]
    assert check.majority == pytest.approx(references.count("positive") / len(references))


def test_choice_outputs_choose_choice_accuracy(tokenizer: Any, tmp_path: Path) -> None:
    task = _task(write_json(tmp_path / "quiz.json", choice_rows(200)))
    assert check_task_data(task, 0, tokenizer, 256, ALPACA).metric == "choice"


def test_a_metric_that_cannot_score_the_outputs_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    task = _task(write_json(tmp_path / "reviews.json", label_rows(200)), metric="choice")
    (problem,) = check_task_data(task, 0, tokenizer, 512, ALPACA).problems
    assert problem.startswith("task.metric='choice' but") and "name no option letter A-E" in problem


def test_given_labels_must_cover_the_held_out_outputs(tokenizer: Any, tmp_path: Path) -> None:
    task = _task(write_json(tmp_path / "r.json", label_rows(200)), labels=("positive", "negative"))
    (problem,) = check_task_data(task, 0, tokenizer, 512, ALPACA).problems
    assert problem.startswith("task.labels='positive,negative' lacks held-out outputs ['neutral']")


def test_eval_path_is_the_held_out_set_and_the_whole_file_trains(tmp_path: Path) -> None:
    train = write_json(tmp_path / "train.json", label_rows(120, seed=1))
    test = write_json(tmp_path / "test.json", label_rows(30, seed=2))
    task = _task(train, eval_path=str(test))
    assert len(load_pool(task, 0)) == 120
    assert [r["input"] for r in held_out(task, 0)] == [r["input"] for r in json.loads(test.read_text())]


def test_partitions_too_small_for_a_node_are_named(tmp_path: Path) -> None:
    rows = [{**row, "group": "a" if i < 40 else "b"} for i, row in enumerate(label_rows(50))]
    path = write_json(tmp_path / "g.json", rows)
    task = _task(path, num_eval=5, partitioner="dirichlet", partition_by="group", alpha=0.01)
    with pytest.raises(DataError) as error:
        check_partitions(task, 4, 0)
    assert str(error.value).startswith(
        "task.partitioner='dirichlet' (task.alpha=0.01, task.partition-by='group')"
    )
    assert str(error.value).endswith("raise task.alpha, set task.partitioner='iid', or use more data")
    line, sizes = check_partitions(replace(task, partitioner="iid"), 4, 0)
    assert len(sizes) == 4
    assert line == "data: 45 training examples over 4 partitions (iid); smallest 11 (partition 1), largest 12"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "is an empty file; expected Alpaca-style examples"),
        ("{not json", "is not valid JSON: line 1 column 2: Expecting property name"),
        (json.dumps([{"instruction": "x", "answer_text": "y"}]), "but needs ['output']"),
        (json.dumps([{"instruction": "x", "output": ["a", "b"]}]), "column 'output' holds a list in row 1"),
        (json.dumps([{"instruction": "x", "output": ""}]), "every example's output is empty"),
    ],
)
def test_unusable_files_fail_with_one_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        load_file(str(path))
    assert expected in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(f"task.data-path={str(path)!r}")


def test_numeric_outputs_become_text(tmp_path: Path) -> None:
    path = tmp_path / "labels.json"
    path.write_text(
        json.dumps([{"instruction": "Is it spam?", "input": f"m{i}", "output": i % 2} for i in range(9)])
    )
    assert load_file(str(path))["output"][:3] == ["0", "1", "0"]


def test_a_nested_value_or_broken_json_stops_in_preflight_with_one_line(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    """Both used to surface as a `datasets` error without the column, the row, the line or the column."""
    rows: list[dict[str, Any]] = [dict(row) for row in label_rows(60)]
    rows[7]["instruction"] = {"text": rows[7]["instruction"]}
    nested = write_json(tmp_path / "nested.json", rows)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": d}\n')
    for path, line in (
        (nested, f"task.data-path={str(nested)!r}: column 'instruction' holds a dict in row 8 ("),
        (broken, f"task.data-path={str(broken)!r} is not valid JSON: line 2 column 32: Expecting value"),
    ):
        config = {**run_config, "task.data-path": str(path), "output.dir": str(tmp_path / "out")}
        with pytest.raises(ConfigError) as error:
            preflight(config)
        (problem,) = error.value.problems
        assert problem.startswith(line)
        assert not (tmp_path / "out").exists()
