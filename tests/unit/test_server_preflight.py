"""The server's preflight: a device, model folder, output folder or checkpoint that would fail later
stops the run before round 1 with one line naming it, and nothing is written under output.dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pollen.adapter import LoraFactors
from pollen.config import ConfigError, parse_run_config
from server_app import artifacts
from server_app.artifacts import CHECKPOINT_DIR, RunFolder
from server_app.checkpoint import STATE_FILE, Checkpoint, save_checkpoint
from server_app.preflight import preflight
from tasks.embedded import embedded_model_dir


def _files(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (to see that nothing was written)."""
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))} if folder.exists() else {}


def _problems(config: dict[str, Any]) -> list[str]:
    out = Path(config["output.dir"])
    before = _files(out)
    with pytest.raises(ConfigError) as error:
        preflight(config)
    assert _files(out) == before, "the preflight wrote under output.dir"
    assert all("\n" not in line for line in error.value.problems)
    return error.value.problems


@pytest.fixture
def config(run_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    small = {"task.num-train": 200, "task.num-eval": 20}  # the data check runs on every call: keep it short
    return {**run_config, **small, "output.dir": str(tmp_path / "out")}


@pytest.fixture
def model_copy(tmp_path: Path) -> Path:
    """A copy of the embedded model folder, to damage."""
    return Path(shutil.copytree(embedded_model_dir(), tmp_path / "model"))


# ---- the model folder --------------------------------------------------------------------------
def test_a_model_folder_without_weights(config: dict[str, Any], model_copy: Path) -> None:
    (model_copy / "model.safetensors").unlink()
    assert _problems({**config, "model.name": str(model_copy)}) == [
        f"model folder {model_copy} holds no weights: expected model.safetensors (or a sharded "
        "model.safetensors.index.json, or pytorch_model.bin); save the model into it with save_pretrained"
    ]


def test_truncated_weights(config: dict[str, Any], model_copy: Path) -> None:
    weights = model_copy / "model.safetensors"
    whole = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(whole - 1000)
    assert _problems({**config, "model.name": str(model_copy)}) == [
        f"model folder {model_copy}: model.safetensors is truncated: {whole - 1000} bytes, its header "
        f"describes {whole}; copy or save the model again"
    ]


def test_weights_that_are_not_safetensors(config: dict[str, Any], model_copy: Path) -> None:
    (model_copy / "model.safetensors").write_bytes(b"<html>404 Not Found</html>")
    (line,) = _problems({**config, "model.name": str(model_copy)})
    assert line.startswith(f"model folder {model_copy}: model.safetensors is truncated or not a safetensors")


def test_a_config_json_that_is_not_json(config: dict[str, Any], model_copy: Path) -> None:
    (model_copy / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": }')
    assert _problems({**config, "model.name": str(model_copy)}) == [
        f"model folder {model_copy}: config.json is not valid JSON (line 2 column 18: Expecting value); "
        "save the model again with save_pretrained"
    ]


def test_a_config_json_transformers_cannot_read(config: dict[str, Any], model_copy: Path) -> None:
    (model_copy / "config.json").write_text('{"hidden_size": 64}')
    (line,) = _problems({**config, "model.name": str(model_copy)})
    assert line.startswith(f"model folder {model_copy}: config.json does not load (Unrecognized model")
    assert line.endswith("save the model again with save_pretrained")


def test_a_model_folder_without_tokenizer(config: dict[str, Any], model_copy: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model_copy / name).unlink()
    assert _problems({**config, "model.name": str(model_copy)}) == [
        f"model folder {model_copy} has no tokenizer: expected tokenizer.json or tokenizer.model; save the "
        "model's tokenizer into it with tokenizer.save_pretrained"
    ]


# ---- the device ---------------------------------------------------------------------------------
def test_cuda_on_a_machine_without_it(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _problems({**config, "model.device": "cuda"}) == [
        "model.device='cuda' asks for CUDA but this machine has no usable CUDA device; use 'auto' or 'cpu'"
    ]


def test_a_cuda_index_the_machine_lacks(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert _problems({**config, "model.device": "cuda:3"}) == [
        "model.device='cuda:3' asks for CUDA device 3, but this machine has 2 (cuda:0 to cuda:1); use one "
        "of them, 'cuda' or 'auto'"
    ]


def test_mps_on_a_machine_without_it(config: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert _problems({**config, "model.device": "mps"}) == [
        "model.device='mps' asks for Apple's Metal (MPS) backend, which this machine does not have; use "
        "'auto' or 'cpu'"
    ]


# ---- output.dir and the run folder --------------------------------------------------------------
def test_output_dir_that_is_a_file(config: dict[str, Any], tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.write_text("not a folder")
    assert _problems(config) == [
        f"output.dir={str(target)!r} is a file, not a folder: name a folder (made when missing)"
    ]
    below = {**config, "output.dir": str(target / "runs")}
    assert _problems(below) == [
        f"output.dir={str(target / 'runs')!r} cannot be made: {target} is a file, not a folder; "
        "name a folder path"
    ]


def test_output_dir_that_is_not_writable(
    config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # as root every folder is writable to os.access, so the refusal is simulated for this one folder
    real_access = artifacts.os.access
    monkeypatch.setattr(artifacts.os, "access", lambda p, mode: Path(p) != tmp_path and real_access(p, mode))
    assert _problems(config) == [
        f"output.dir={config['output.dir']!r} is not writable (its parent {tmp_path} refuses this user); "
        "choose a folder you can write to or change its permissions"
    ]


def test_run_folder_that_is_a_file(config: dict[str, Any]) -> None:
    out = Path(config["output.dir"])
    out.mkdir()
    (out / "r1").write_text("x")
    assert _problems({**config, "output.run-name": "r1"}) == [
        f"output folder {out / 'r1'} is a file, not a folder; choose another output.run-name or remove it"
    ]


@pytest.mark.parametrize("name", ["../escape", "a\\b", "..", "x" * 101, "tab\there", "nul\x00"])
def test_run_names_that_are_not_a_plain_folder_name(config: dict[str, Any], name: str) -> None:
    assert _problems({**config, "output.run-name": name}) == [
        f"output.run-name={name!r} is not valid: expected a plain folder name (no '/' or '\\', not '.' or "
        "'..', no control characters, at most 100 characters), or empty for a timestamp"
    ]


# ---- output.resume ------------------------------------------------------------------------------
def _finished_run(config: dict[str, Any], **meta: Any) -> Path:
    """A run folder as main() leaves it after round 1: run_config.json and a checkpoint."""
    cfg = parse_run_config({**config, "output.run-name": "r1"})
    folder = RunFolder(Path(config["output.dir"]) / "r1")
    model_path = str(embedded_model_dir())
    written = {"fingerprint": "f", "strategy": cfg.strategy.name, "lora_rank": cfg.lora.rank, **meta}
    folder.create({"run_config": cfg.to_dict(), "base_model_path": model_path, **written})
    pair = LoraFactors(a=torch.ones(cfg.lora.rank, 4), b=torch.zeros(4, cfg.lora.rank), scale=2.0)
    checkpoint = Checkpoint(1, {"layers.0.q_proj": pair}, {}, [{"round": 1}], written)
    save_checkpoint(folder.path / CHECKPOINT_DIR, checkpoint)
    return folder.path


def _resume(config: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**config, "output.run-name": "r1", "output.resume": True, **changes}


def test_resuming_a_run_configured_alike_passes(config: dict[str, Any]) -> None:
    _finished_run(config)
    assert preflight(_resume(config)).cfg.output.resume


@pytest.mark.parametrize(
    ("key", "now", "was"), [("lora.rank", 16, 8), ("strategy.name", "zeropad", "fedavg")]
)
def test_resuming_with_another_setting_names_both_values(
    config: dict[str, Any], key: str, now: Any, was: Any
) -> None:
    run = _finished_run(config)
    assert _problems(_resume(config, **{key: now})) == [
        f"output.resume=true: {key}={now!r}, but the run in {run} was made with {key}={was!r}; "
        f"resume with {key}={was!r}, or start a new run under another output.run-name"
    ]


def test_resuming_on_another_base_model(config: dict[str, Any], model_copy: Path) -> None:
    run = _finished_run(config)
    assert _problems(_resume(config, **{"model.name": str(model_copy)})) == [
        f"output.resume=true: model.name={str(model_copy)!r}, but the run in {run} was made with "
        "model.name='embedded'; resume with model.name='embedded', or start a new run under another "
        "output.run-name"
    ]
    # the same folder by another name is the same model
    assert preflight(_resume(config, **{"model.name": str(embedded_model_dir())})).cfg.output.resume


def test_a_checkpoint_with_an_impossible_round(config: dict[str, Any]) -> None:
    state = _finished_run(config) / CHECKPOINT_DIR / STATE_FILE
    text = state.read_text()
    state.write_text(text.replace('"round": 1,', '"round": 1e400,', 1))
    assert '"round": 1e400' in state.read_text()
    assert _problems(_resume(config)) == [
        f"output.resume=true: {state} records round inf; expected a whole number >= 0"
    ]


def test_a_checkpoint_whose_adapter_file_changed(config: dict[str, Any]) -> None:
    folder = _finished_run(config) / CHECKPOINT_DIR
    (adapter,) = folder.glob("adapter-*.safetensors")
    adapter.write_bytes(adapter.read_bytes()[:-4] + b"\0\0\0\1")
    assert _problems(_resume(config)) == [
        f"output.resume=true: {adapter} does not match the checksum in {STATE_FILE}; it is damaged"
    ]


def test_a_checkpoint_from_before_the_rank_was_recorded(config: dict[str, Any]) -> None:
    state = _finished_run(config) / CHECKPOINT_DIR / STATE_FILE
    document = json.loads(state.read_text())
    del document["meta"]["lora_rank"]
    state.write_text(json.dumps(document))
    assert _problems(_resume(config)) == [
        f"output.resume=true: {state} records no lora_rank (an older Pollen wrote it), so it cannot be "
        "checked against this run; start a new run under another output.run-name"
    ]
