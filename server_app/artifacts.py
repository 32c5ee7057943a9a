"""The run folder: resolved config, one metrics line per round, and the final PEFT adapter.

Files are written atomically (temporary name, then rename), and the folder itself only appears once
configuration, model and data have passed their checks, so bad input leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pollen.config import RunConfig
from server_app.checkpoint import STATE_FILE, Checkpoint, CheckpointError, checkpoint_round, load_checkpoint

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"  # round checkpoints (server_app.checkpoint), for output.resume
STATUS_FILE = "status.json"  # {"status": "running" | "completed" | "failed", "reason", "round"}


def run_folder_path(output_dir: str, run_name: str) -> Path:
    """``<output_dir>/<run_name>``, with a timestamp name when ``run_name`` is empty."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(output_dir).expanduser() / name


def check_output_dir(output_dir: str) -> str:
    """'' when run folders can be made under ``output.dir`` (it or its nearest existing parent is a
    writable folder); else the one-line reason. Nothing is created."""
    path = Path(output_dir).expanduser()
    existing = path
    try:
        while not existing.exists():  # where the missing folders would be created
            existing = existing.parent
        if existing == path and not path.is_dir():
            return f"output.dir={output_dir!r} is a file, not a folder: name a folder (made when missing)"
        if not existing.is_dir():
            return (
                f"output.dir={output_dir!r} cannot be made: {existing} is a file, not a folder; "
                "name a folder path"
            )
    except OSError as exc:
        return f"output.dir={output_dir!r} cannot be inspected ({exc.strerror or exc}); name another folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it" if existing == path else f"its parent {existing}"
        return (
            f"output.dir={output_dir!r} is not writable ({where} refuses this user); choose a folder you "
            "can write to or change its permissions"
        )
    return ""


def check_run_folder_free(path: Path) -> None:
    """A run never overwrites another: fail before training if the folder already holds one."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"output folder {path} is a file, not a folder; choose another output.run-name or remove it"
        )
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"output folder {path} already holds a run; choose another output.run-name or remove it"
        )


def _recorded(run_dir: Path) -> dict[str, Any]:
    """run_config.json of ``run_dir`` ({} when absent or unreadable: resuming does not need it)."""
    try:
        document = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return document if isinstance(document, dict) else {}


def _same_model(name: str, path: str, then_name: Any, then_path: Any) -> bool:
    """The same base model: the same model.name, or names resolving to the same folder."""
    if name == then_name:
        return True
    try:
        return isinstance(then_path, str) and Path(path).resolve() == Path(then_path).resolve()
    except (OSError, RuntimeError):
        return False


def check_resume(run_dir: Path, cfg: RunConfig, model_path: str) -> tuple[list[str], Checkpoint | None]:
    """output.resume: ``run_dir`` holds a whole checkpoint, of a run with this lora.rank, strategy and model.

    Returns the problems and the checkpoint, read once here (checksum, tensors) for the resume to use;
    the base-model fingerprint and the adapter's shapes are compared once the model is loaded
    (server_app.app.resume).
    """
    folder = run_dir / CHECKPOINT_DIR
    state = folder / STATE_FILE
    try:
        if checkpoint_round(folder) is None:
            return [
                f"output.resume=true but {run_dir} holds no checkpoint; start it with output.resume=false"
            ], None
        checkpoint = load_checkpoint(folder)
    except CheckpointError as exc:
        return [f"output.resume=true: {exc}"], None
    except (OverflowError, ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        # anything server_app.checkpoint failed to turn into a CheckpointError still gives one line
        return [f"output.resume=true: {state} is damaged ({exc}); restore it or remove the run folder"], None
    if "lora_rank" not in checkpoint.meta:
        return [
            f"output.resume=true: {state} records no lora_rank (an older Pollen wrote it), so it cannot be "
            "checked against this run; start a new run under another output.run-name"
        ], None
    recorded = _recorded(run_dir)
    then = recorded.get("run_config")
    section = then.get("model") if isinstance(then, dict) else None
    then_model = section.get("name") if isinstance(section, dict) else None
    if then_model is not None and _same_model(
        cfg.model.name, model_path, then_model, recorded.get("base_model_path")
    ):
        then_model = cfg.model.name  # e.g. a relative and an absolute path to one folder
    compared = (
        ("lora.rank", cfg.lora.rank, checkpoint.meta["lora_rank"]),
        ("strategy.name", cfg.strategy.name, checkpoint.meta.get("strategy")),
        ("model.name", cfg.model.name, then_model),
    )
    problems = [
        f"output.resume=true: {key}={now!r}, but the run in {run_dir} was made with {key}={was!r}; "
        f"resume with {key}={was!r}, or start a new run under another output.run-name"
        for key, now, was in compared
        if was is not None and now != was
    ]
    return problems, checkpoint


def check_output(cfg: RunConfig, model_path: str) -> tuple[list[str], Checkpoint | None]:
    """output.dir can hold run folders; a new run's folder is free, a resumed run's checkpoint fits.

    Returns the problems and, resuming, the checkpoint as read for the check.
    """
    problem = check_output_dir(cfg.output.dir)
    if problem:
        return [problem], None
    run_dir = run_folder_path(cfg.output.dir, cfg.output.run_name)
    if cfg.output.resume:
        return check_resume(run_dir, cfg, model_path)
    try:
        check_run_folder_free(run_dir)
    except FileExistsError as exc:
        return [str(exc)], None
    except OSError as exc:
        reason = (
            f"output folder {run_dir} cannot be read ({exc.strerror or exc}); choose another output.run-name"
        )
        return [reason], None
    return [], None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class RunFolder:
    """Writes one run's artifacts under ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def create(self, resolved_config: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / CONFIG_FILE, json.dumps(resolved_config, indent=2, sort_keys=True).encode())

    def mark(self, status: str, reason: str = "", server_round: int | None = None) -> None:
        """Record whether the run is running, completed or failed (and why), for people and tools."""
        record = {"status": status, "reason": reason, "round": server_round, "time": time.strftime("%FT%T")}
        write_atomic(self.path / STATUS_FILE, json.dumps(record, indent=2).encode())

    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """Add one round's line to metrics.jsonl (the whole file is rewritten atomically)."""
        target = self.path / METRICS_FILE
        previous = target.read_bytes() if target.exists() else b""
        write_atomic(target, previous + (json.dumps(dict(row), sort_keys=True) + "\n").encode())

    def rewrite_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """metrics.jsonl holding exactly ``rows`` (on resume: the rounds the checkpoint covers)."""
        text = "".join(json.dumps(dict(row), sort_keys=True) + "\n" for row in rows)
        write_atomic(self.path / METRICS_FILE, text.encode())

    def save_adapter(self, peft_config: Any, state: Mapping[str, torch.Tensor], base_model_path: str) -> Path:
        """A standard PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
        from safetensors.torch import save_file

        folder = self.path / ADAPTER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        config = peft_config.to_dict()
        config["base_model_name_or_path"] = base_model_path
        for key, value in list(config.items()):
            if isinstance(value, set):
                config[key] = sorted(value)
        write_atomic(
            folder / "adapter_config.json", json.dumps(config, indent=2, sort_keys=True, default=str).encode()
        )
        tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
        tmp = folder / ".adapter_model.safetensors.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, folder / "adapter_model.safetensors")
        return folder
