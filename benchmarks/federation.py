"""The default federation's cost: round time against the same steps in one plain process, memory, bytes.

Usage: python benchmarks/federation.py [--rounds 6] [--quick]

1. Model footprint of the embedded base at 4-bit and unquantized (transformers' memory footprint).
2. A plain process (no Flower) loads the 4-bit base once and runs the training of one round with the
   ClientApp's own code (client_app/worker.py): the nodes a round samples times `train.local-steps`,
   on their partitions; its time and peak memory.
3. `flwr run .` with the shipped configuration (10 simulated nodes); the steady round's fit time
   (sending, training, aggregating: rounds 2+), whole round time, node peak memory and bytes.
Writes the "federation" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import (  # noqa: E402
    load_average,
    machine_line,
    nodes_per_round,
    run_federation,
    write_section,
)
from scripts.flower_run import shipped_run_config  # noqa: E402

NUM_NODES = 10


def footprints() -> dict[str, float]:
    """Bytes of the embedded base model's weights at 4-bit and at full precision."""
    from pollen.config import parse_run_config
    from pollen.model import load_base_model
    from tasks.embedded import resolve_model_name

    cfg = parse_run_config(shipped_run_config())
    path = resolve_model_name(cfg.model.name)
    out: dict[str, float] = {}
    for quantization in ("4bit", "none"):
        model: Any = load_base_model(path, type(cfg.model)(path, quantization, "cpu", "float32"))
        out[quantization] = float(model.get_memory_footprint())
        out["parameters"] = float(sum(p.numel() for p in model.parameters()))
    return out


def plain_worker(nodes: int) -> dict[str, float]:
    """Load once, then train round 1 of the first ``nodes`` partitions as the ClientApp does; no Flower."""
    import resource

    from client_app.worker import load_worker, train_round
    from pollen.config import parse_run_config
    from pollen.protocol import knobs_for
    from tasks.data import node_data

    cfg = parse_run_config(shipped_run_config())
    worker = load_worker(cfg)
    worker.host.activate(cfg.lora.rank)
    received = worker.host.read()  # round 1's global adapter: the fresh one
    knobs = knobs_for(cfg, cfg.lora.rank)
    seconds = 0.0
    for partition in range(nodes):
        train, _ = node_data(cfg.task, partition, NUM_NODES, cfg.seed)
        done = train_round(worker, received, knobs, train, partition, cfg.task.prompt_format)
        seconds += done.train.seconds
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "steps": nodes * knobs.local_steps, "peak_rss_mb": peak}


def run_plain(nodes: int) -> dict[str, float]:
    """plain_worker in a fresh process, so its peak memory is its own."""
    done = subprocess.run(
        [sys.executable, __file__, "--plain-worker", str(nodes)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def _cell(value: Any, digits: int) -> str:
    """A figure of the per-round table; a dash for a round that was not evaluated (eval.every)."""
    return "–" if value is None else f"{value:.{digits}f}"


def render(
    command: str,
    load: float | None,
    sizes: dict[str, float],
    plain: dict[str, float],
    rows: list[dict[str, Any]],
    wall: float,
) -> str:
    steady = rows[1:] or rows
    fit = statistics.median(r["fit_seconds"] for r in steady)
    whole = statistics.median(r["round_seconds"] for r in steady)
    ratio = fit / plain["seconds"]
    node_peak = max(r["client_peak_rss_mb"] or 0.0 for r in rows)
    mib = 1024 * 1024
    lines = [
        "## Federation: time per round, memory, model footprint",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shipped configuration, {NUM_NODES} simulated nodes, {len(rows)} rounds; the whole `flwr run` took "
        f"{wall:.0f} s including start-up.",
        "",
        "| figure | value |",
        "|---|---:|",
        f"| embedded base parameters | {sizes['parameters'] / 1e6:.2f} M |",
        f"| base footprint, 4-bit NF4 (double quant) | {sizes['4bit'] / mib:.2f} MiB |",
        f"| base footprint, unquantized float32 | {sizes['none'] / mib:.2f} MiB |",
        f"| plain process: {plain['steps']:.0f} training steps (one round's worth) "
        f"| {plain['seconds']:.1f} s |",
        f"| plain process peak memory | {plain['peak_rss_mb']:.0f} MiB |",
        f"| steady round, fit (send, train, aggregate), median of rounds 2+ | {fit:.1f} s |",
        f"| steady round fit / plain process | {ratio:.2f}x |",
        f"| steady round including central evaluation | {whole:.1f} s |",
        f"| peak memory of a node process (max over rounds) | {node_peak:.0f} MiB |",
        f"| bytes per round, uplink / fp32 uplink | {rows[-1]['uplink_bytes'] / 1e6:.3f} MB / "
        f"{rows[-1]['uplink_bytes_fp32'] / 1e6:.3f} MB |",
        f"| bytes per round, downlink / fp32 downlink | {rows[-1]['downlink_bytes'] / 1e6:.3f} MB / "
        f"{rows[-1]['downlink_bytes_fp32'] / 1e6:.3f} MB |",
        "",
        "| round | eval_loss | exact_match | fit s | round s |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['round']} | {_cell(r.get('eval_loss'), 4)} | {_cell(r.get('exact_match'), 3)} "
        f"| {r['fit_seconds']:.1f} | "
        f"{r['round_seconds']:.1f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6, help="federated rounds to run (>= 2)")
    parser.add_argument("--plain-worker", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_worker:
        print(json.dumps(plain_worker(args.plain_worker)))
        return 0
    if args.rounds < 2:
        parser.error(f"--rounds={args.rounds}: at least 2 rounds are needed for a steady round")
    load = load_average()
    sizes = footprints()
    cfg = shipped_run_config()
    sampled = nodes_per_round(cfg, NUM_NODES)
    print(f"plain process: {sampled} nodes x {cfg['train.local-steps']} steps", flush=True)
    plain = run_plain(sampled)
    print(f"federation: {args.rounds} rounds on {NUM_NODES} nodes", flush=True)
    rows, wall = run_federation("bench", {}, args.rounds, NUM_NODES)
    command = "python benchmarks/federation.py" + ("" if args.rounds == 6 else f" --rounds {args.rounds}")
    section = render(command, load, sizes, plain, rows, wall)
    print(section)
    write_section("federation", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
