"""`pollen-check`: the report on the tiny Llama, and a one-line reason whenever a node cannot join."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client_app import preflight
from client_app.preflight import doubling, largest_fitting, main

QUICK = ["--quantization", "none", "--max-seq-len", "16", "--max-rank", "4", "--max-batch", "4"]


def _last_line(capsys: pytest.CaptureFixture[str]) -> str:
    return capsys.readouterr().out.strip().splitlines()[-1]


def test_doubling_ends_at_the_limit() -> None:
    assert doubling(1) == [1]
    assert doubling(8) == [1, 2, 4, 8]
    assert doubling(12) == [1, 2, 4, 8, 12]


def test_largest_fitting_stops_at_first_failure_and_on_time() -> None:
    def fits(value: int) -> tuple[bool, int]:
        return value <= 4, value * 10

    assert largest_fitting([1, 2, 4, 8, 16], fits, deadline=float("inf")) == (4, 40, False)
    assert largest_fitting([1, 2], fits, deadline=0.0) == (None, 0, True)


def test_report_on_the_tiny_model(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "ours.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(7)))
    code = main(["--model", str(tiny_model_dir), "--data-path", str(data), "--device", "cpu", *QUICK])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "device         cpu" in out
    assert "RAM " in out and "GB available" in out
    assert "bitsandbytes   4-bit on cpu: works" in out
    assert f"{data}: 7 rows, columns instruction, output, input" in out
    assert "largest rank   8 at batch 1" in out and "largest batch  4 at rank 8" in out
    last = out.strip().splitlines()[-1]
    assert last.startswith("OK: this node can join with lora-rank <= 8 and train.batch-size <= 4")

    from pollen.config import LoraConfig, ModelConfig
    from pollen.model import LoraHost, load_base_model

    base = load_base_model(str(tiny_model_dir), ModelConfig(str(tiny_model_dir), "none", "cpu", "auto"))
    targets = tuple(preflight.DEFAULT_TARGETS.split(","))
    assert f"fingerprint {LoraHost(base, LoraConfig(8, 16.0, 0.0, targets)).fingerprint})" in last


def test_nothing_fits_a_tiny_budget(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model", str(tiny_model_dir), "--memory-budget-gb", "0.000001", *QUICK])
    assert code == 1
    assert _last_line(capsys).startswith("UNUSABLE: not even rank 1 with batch 1 at 16 tokens fits in")


def test_missing_model_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tmp_path / "nowhere"), *QUICK]) == 1
    last = _last_line(capsys)
    assert last.startswith(f"UNUSABLE: base model '{tmp_path / 'nowhere'}' does not load:")
    assert "config.json" in last


def test_missing_data_file_is_one_line(tiny_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", str(tiny_model_dir), "--data-path", "/no/such/file.jsonl", *QUICK]) == 1
    assert _last_line(capsys) == "UNUSABLE: --data-path='/no/such/file.jsonl' does not exist or is not a file"


def test_cuda_on_a_machine_without_it(capsys: pytest.CaptureFixture[str]) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", "cuda", *QUICK]) == 1
    assert _last_line(capsys).startswith("UNUSABLE: --device='cuda' asks for CUDA")


def test_bad_arguments_name_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--lora-rank", "0"]) == 1
    assert _last_line(capsys) == "UNUSABLE: --lora-rank 0 is not valid: expected an integer >= 1"


def test_quantization_needs_working_bitsandbytes(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(preflight, "check_bitsandbytes", lambda device: "bitsandbytes cannot be imported")
    assert main(["--model", str(tiny_model_dir), "--quantization", "4bit"]) == 1
    assert _last_line(capsys) == (
        "UNUSABLE: --quantization 4bit needs bitsandbytes: bitsandbytes cannot be imported"
    )


def test_a_model_folder_without_weights_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    (folder / "model.safetensors").unlink()
    assert main(["--model", str(folder), *QUICK]) == 1
    assert _last_line(capsys) == (
        f"UNUSABLE: model folder {folder} holds no weights: expected model.safetensors (or a sharded "
        "model.safetensors.index.json, or pytorch_model.bin); save the model into it with save_pretrained"
    )


def test_a_nested_value_in_the_data_is_one_line(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "ours.jsonl"
    rows = [{"instruction": f"q{i}", "output": ["a", str(i)] if i == 2 else f"a{i}"} for i in range(7)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert main(["--model", str(tiny_model_dir), "--data-path", str(data), *QUICK]) == 1
    assert _last_line(capsys) == (
        f"UNUSABLE: --data-path={str(data)!r}: column 'output' holds a list in row 3 (\"['a', '2']\"); "
        "expected text (or a number) in every row: write it as a string"
    )
