"""Run the app the way a user does (`flwr run . --stream`) in an isolated Flower home, then clean up.

`flwr run` starts a detached local SuperLink that outlives the command; each run here gets its own
FLWR_HOME and ports, and every process of that SuperLink is ended afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import tomllib

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FlowerRun:
    returncode: int
    output: str
    seconds: float


def _flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def shipped_run_config() -> dict[str, Any]:
    """The run config `flwr run .` starts from: pyproject's [tool.flwr.app.config], flattened."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return _flatten(data["tool"]["flwr"]["app"]["config"])


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """`--run-config` text: space-separated TOML `key=value` pairs."""
    return " ".join(f"{key}={_toml_value(value)}" for key, value in overrides.items())


def _stop_superlink(flwr_home: Path) -> None:
    """End every process of the local SuperLink started under ``flwr_home`` (and its children)."""
    marker = str(flwr_home)
    victims: list[psutil.Process] = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmdline and marker in cmdline:
            victims.append(proc)
            victims.extend(proc.children(recursive=True))
    for proc in victims:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(victims, timeout=15)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass


def flwr_run(
    flwr_home: Path,
    overrides: Mapping[str, Any],
    num_supernodes: int,
    timeout: float = 900.0,
    port_offset: int = 0,
) -> FlowerRun:
    """Run `flwr run . --stream` from the repository with the given run-config overrides."""
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or "flwr"
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(39191 + port_offset),
        FLWR_LOCAL_CONTROL_API_PORT=str(39193 + port_offset),
        PATH=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
    )
    command = [
        flwr,
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
        "--run-config",
        run_config_arg(overrides),
    ]
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
        output, code = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        output += f"\n[flwr run timed out after {timeout:.0f} s]"
        code = -1
    finally:
        _stop_superlink(flwr_home)
    return FlowerRun(returncode=code, output=output, seconds=time.monotonic() - started)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of a run folder's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
