"""An append-only log of benchmark runs (one JSON object per line), so a table can grow seed by seed.

A federated benchmark row costs minutes per seed; logging every finished run lets a later invocation
add seeds without repeating the ones already measured, and keeps where and when each number was made.
Runs belong to the same experiment when their ``config`` fingerprint (the shipped run config) matches.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# What the benchmarks themselves write: changes there do not make a run's code differ from its commit.
OUTPUTS = (":(exclude)docs/BENCHMARKS.md", ":(exclude)benchmarks/results")


# Keys added after runs were logged, at the value that behaves as before they existed: left out of the
# hash so those runs still count. "all-linear" on the embedded model is exactly the seven projections
# the old default named (tests/unit/test_architectures.py checks it).
UNCHANGED_BY_DEFAULT: dict[str, Any] = {
    "task.eval-path": "",
    "task.prompt-format": "auto",
    "task.metric": "auto",
    "task.labels": "",
    "train.gradient-checkpointing": False,
    "train.micro-batch-size": 0,
    "eval.every": 1,
    "eval.background": True,  # when the evaluation runs, not what it finds
    # bounds on what a node may send; no honest node of the benchmarks comes near them
    "strategy.max-rank": 256,
    "strategy.max-update-ratio": 25.0,
    "strategy.max-node-examples": 1000000,
}
# The learning benchmarks evaluate after every round (a curve point per round), as their logged runs did
# before eval.every existed; the shipped default evaluates less often.
EVERY_ROUND = {"eval.every": 1}
EMBEDDED_ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def config_fingerprint(run_config: Mapping[str, Any]) -> str:
    """Short stable hash of a run config: runs with the same fingerprint ran the same settings."""
    config = {k: v for k, v in run_config.items() if UNCHANGED_BY_DEFAULT.get(k, object()) != v}
    if config.get("model.name") == "embedded" and config.get("lora.target-modules") == "all-linear":
        config["lora.target-modules"] = EMBEDDED_ALL_LINEAR
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def git_commit(root: Path = ROOT) -> str:
    """The checked-out commit (short), "+changes" when tracked code differs from it; "unknown" outside git."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *OUTPUTS],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+changes" if dirty else "")


def today() -> str:
    """UTC date of a run, ISO format."""
    return datetime.datetime.now(datetime.timezone.utc).date().isoformat()


def read(path: Path) -> list[dict[str, Any]]:
    """Every record in the log, oldest first; an absent log is empty. A malformed line is an error."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: not a JSON object ({error.msg}); fix or delete the line"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def append(path: Path, record: Mapping[str, Any]) -> None:
    """Add one record as a line of its own, written whole and flushed before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.write(json.dumps(dict(record), sort_keys=True) + "\n")
        log.flush()


def latest(
    records: Iterable[Mapping[str, Any]], keys: tuple[str, ...]
) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The newest record for every distinct value of ``keys`` (later lines replace earlier ones)."""
    newest: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        newest[tuple(record.get(key) for key in keys)] = dict(record)
    return newest
