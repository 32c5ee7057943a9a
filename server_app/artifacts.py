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

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "run_config.json"
ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoint"  # round checkpoints (server_app.checkpoint), for output.resume
STATUS_FILE = "status.json"  # {"status": "running" | "completed" | "failed", "reason", "round"}


def run_folder_path(output_dir: str, run_name: str) -> Path:
    """``<output_dir>/<run_name>``, with a timestamp name when ``run_name`` is empty."""
    name = run_name or time.strftime("%Y%m%d-%H%M%S")
    return Path(output_dir).expanduser() / name


def check_run_folder_free(path: Path) -> None:
    """A run never overwrites another: fail before training if the folder already holds one."""
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"output folder {path} already holds a run; choose another output.run-name or remove it"
        )


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
