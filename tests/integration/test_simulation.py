"""A real Flower simulation through `flwr run .`: real ServerApp, real ClientApps, real 4-bit base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from scripts.flower_run import flwr_run, read_metrics

pytestmark = pytest.mark.integration

# The shipped configuration shrunk so that a 3-node, 2-round run takes about a minute.
SMALL: dict[str, Any] = {
    "num-server-rounds": 2,
    "train.local-steps": 3,
    "train.batch-size": 8,
    "task.num-train": 300,
    "task.num-eval": 16,
    "task.max-new-tokens": 6,
    "strategy.fraction-train": 1.0,
    "strategy.fraction-evaluate": 0.5,
    "strategy.min-nodes": 3,
    "strategy.round-timeout": 300.0,
}


def test_three_nodes_two_rounds_end_to_end(tmp_path: Path) -> None:
    schedule = {"train.lr": 0.003, "train.lr-schedule": "cosine", "train.lr-min": 0.0006}
    overrides = {**SMALL, **schedule, "output.dir": str(tmp_path / "out"), "output.run-name": "it"}
    overrides["eval.every"] = 1  # both rounds carry every figure
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=3)
    run_dir = tmp_path / "out" / "it"
    assert (run_dir / "metrics.jsonl").is_file(), result.output[-4000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert [r["lr"] for r in rows] == pytest.approx([0.003, 0.0006])  # cosine: train.lr down to lr-min
    for row in rows:
        assert row["nodes_sent"] == 3 and row["nodes_accepted"] == 3 and row["nodes_rejected"] == 0
        assert row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0
        for key in ("eval_loss", "exact_match", "train_loss", "round_seconds", "federated_eval_loss"):
            assert isinstance(row[key], float), key
    assert "round 2/2 | eval_loss" in result.output
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    _final_adapter_generates(adapter)


def _final_adapter_generates(adapter: Path) -> None:
    """The saved adapter is a standard PEFT folder: it loads on its base and generates text."""
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert Path(base_path).is_dir()
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    ids = tokenizer(
        "### Instruction:\nAdd the numbers.\n### Input:\n12+7\n### Response:\n", return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_bad_config_stops_before_training_with_one_line(tmp_path: Path) -> None:
    overrides = {**SMALL, "lora.rank": 0, "output.dir": str(tmp_path / "out"), "output.run-name": "bad"}
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=2, timeout=300)
    assert "config: lora.rank=0 is not valid: expected an integer from 1 to 4096" in result.output
    assert not (tmp_path / "out").exists()
    assert "round 1/" not in result.output


@pytest.mark.parametrize("strategy", ["zeropad", "flora", "flexlora", "ffa"])
def test_three_ranks_with_a_4bit_wire(tmp_path: Path, strategy: str) -> None:
    """Nodes of ranks 2, 4 and 8 (rank plan by partition id), 4-bit uplink and downlink."""
    overrides = {
        **SMALL,
        "num-server-rounds": 1,
        "train.local-steps": 2,
        "task.num-eval": 8,
        "strategy.fraction-evaluate": 0.0,
        "strategy.name": strategy,
        "strategy.rank-plan": "2,4,8",
        "wire.uplink-bits": 4,
        "wire.downlink-bits": 4,
        "output.dir": str(tmp_path / "out"),
        "output.run-name": strategy,
    }
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=3)
    run_dir = tmp_path / "out" / strategy
    assert (run_dir / "metrics.jsonl").is_file(), result.output[-4000:]
    (row,) = read_metrics(run_dir)
    assert row["nodes_accepted"] == 3 and row["nodes_rejected"] == 0
    assert row["uplink_bytes"] < 0.2 * row["uplink_bytes_fp32"]
    assert row["downlink_bytes"] < 0.2 * row["downlink_bytes_fp32"]
    for rank in (2, 4, 8):
        assert f"rank {rank}, 4bit on cpu" in result.output
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8


def test_own_file_without_the_partition_column_stops_before_round_1(tmp_path: Path) -> None:
    """The shipped config (Dirichlet over 'skill') on an institution's classification file."""
    from tests.datafiles import label_rows, write_json

    data = write_json(tmp_path / "their.json", label_rows(1000))
    overrides = {"task.data-path": str(data), "output.dir": str(tmp_path / "out"), "output.run-name": "own"}
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=2, timeout=300)
    expected = (
        "ERROR pollen: config: task.partition-by='skill' is not a column of the data (columns: instruction, "
        "input, output); name one of them or set task.partitioner='iid'"
    )
    assert expected in result.output, result.output[-4000:]
    assert "round 1/" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_own_label_file_with_long_prompts_trains_and_reports_label_accuracy(tmp_path: Path) -> None:
    """~250-character prompts at train.max-seq-len=128: prompts are cut, responses kept, loss falls."""
    from tests.datafiles import label_rows, write_json

    data = write_json(tmp_path / "their.json", label_rows(400, skew=0.5))
    overrides = {
        **SMALL,
        "num-server-rounds": 2,
        "train.local-steps": 6,
        "strategy.min-nodes": 2,
        "task.data-path": str(data),
        "task.partitioner": "iid",
        "task.num-eval": 40,
        "strategy.fraction-evaluate": 0.0,
        "eval.every": 1,  # both rounds are scored, so the loss can be compared
        "output.dir": str(tmp_path / "out"),
        "output.run-name": "labels",
    }
    result = flwr_run(tmp_path / "flwr-home", overrides, num_supernodes=2)
    run_dir = tmp_path / "out" / "labels"
    assert (run_dir / "metrics.jsonl").is_file(), result.output[-4000:]
    rows = read_metrics(run_dir)
    assert "examples are longer and lose the start of their input" in result.output
    assert "held-out metric label; majority-label baseline" in result.output
    for row in rows:
        assert row["metric"] == "label" and isinstance(row["label_accuracy"], float)
        assert 0.3 < row["majority_baseline"] < 0.7
        assert row["nodes_accepted"] == 2 and row["train_examples_prompt_cut"] > 0
        assert row["eval_loss"] > 0
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert "| label_accuracy " in result.output and "(majority " in result.output
