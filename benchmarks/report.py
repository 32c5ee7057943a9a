"""Shared by the benchmark scripts: the machine line and writing one section of docs/BENCHMARKS.md."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\n"
    "Every table below was written by the script named in its section, with the command shown, on the\n"
    "machine described there. Timings on a shared 2-core machine move with its load; the load average\n"
    "is recorded next to each table.\n\n"
)


def load_average() -> float | None:
    """1-minute load average, or None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def load_change(load_before: float | None) -> str:
    """ "<before> before / <now> after" for the 1-minute load average; empty where there is none."""
    after = load_average()
    return "" if load_before is None or after is None else f"{load_before:.2f} before / {after:.2f} after"


def machine_line(load_before: float | None) -> str:
    """nproc, CPU model, RAM, torch version and threads, and the load around the run."""
    cpu = platform.processor() or "unknown CPU"
    memory = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f", {int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
                break
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    change = load_change(load_before)
    load = f", load average {change}" if change else ""
    threads = torch.get_num_threads()
    return f"nproc {nproc}, {cpu}{memory}, no GPU, torch {torch.__version__} ({threads} threads){load}"


def write_section(name: str, section: str, path: Path = DOCS) -> None:
    """Replace the text between ``<!-- name:start -->`` and ``<!-- name:end -->``; add it if missing."""
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start_marker}\n{section.strip()}\n{end_marker}"
    text = path.read_text() if path.exists() else HEADER
    start, end = text.find(start_marker), text.find(end_marker)
    if start == -1 and end == -1:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    elif start == -1 or end == -1 or end < start:
        raise ValueError(f"{path}: broken {name} section; fix or delete its markers and rerun")
    else:
        text = text[:start] + block + text[end + len(end_marker) :]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def nodes_per_round(run_config: dict[str, Any], num_nodes: int) -> int:
    """How many nodes a training round samples: the strategies' rule (fraction, at least min-nodes)."""
    from strategies.sampling import sample_size

    fraction, minimum = float(run_config["strategy.fraction-train"]), int(run_config["strategy.min-nodes"])
    return sample_size(num_nodes, fraction, minimum)


def run_federation(
    name: str, overrides: dict[str, Any], rounds: int, num_nodes: int
) -> tuple[list[dict[str, Any]], float]:
    """`flwr run .` with the shipped config plus ``overrides`` in a scratch folder: (metrics rows, wall s)."""
    from scripts.flower_run import flwr_run, read_metrics

    with tempfile.TemporaryDirectory(prefix=f"pollen-{name}-") as tmp:
        config = {**overrides, "num-server-rounds": rounds, "output.dir": tmp, "output.run-name": name}
        result = flwr_run(Path(tmp) / "flwr-home", config, num_supernodes=num_nodes, timeout=3600)
        run_dir = Path(tmp) / name
        if not (run_dir / "metrics.jsonl").is_file():
            raise RuntimeError(f"{name} did not finish:\n" + result.output[-3000:])
        return read_metrics(run_dir), result.seconds
