"""What a federated round costs beyond its training: time and process-tree memory on the round-cost shape.

The shape (benchmarks/round_shape.py): a 3.7M-parameter Llama in 4-bit, a 3000-row Alpaca file, 10
simulated nodes of which 2 train per round, 10 local steps of 16 x 256 tokens, LoRA r=32 on q,v, 5 rounds.
In one invocation it measures the plain QLoRA loop of the same 20 steps (benchmarks/plain_loop.py), then
`flwr run` with the shipped evaluation settings, then with evaluation after every round in line (which
times evaluation alone), each while sampling the memory of the run's whole process tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import tomllib

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.process_memory import MIB, TreeMemory  # noqa: E402
from benchmarks.report import load_average, machine_line, write_section  # noqa: E402
from benchmarks.round_shape import build_model, parameter_count, write_alpaca_file  # noqa: E402

NUM_NODES, NUM_ROWS, PLAIN_STEPS = 10, 3000, 20
LR = 1e-3
SHAPE = {
    "task.name": "alpaca",
    "task.partitioner": "iid",
    "task.num-eval": 200,
    "task.max-new-tokens": 12,
    "lora.rank": 32,
    "lora.alpha": 64.0,
    "lora.target-modules": "q_proj,v_proj",
    "train.local-steps": 10,
    "train.batch-size": 16,
    "train.max-seq-len": 256,
    "train.lr": LR,
    "strategy.fraction-train": 0.2,
    "strategy.min-nodes": 2,
}
# name -> what changes from the shipped configuration (eval.every=2, eval.background=true) besides the shape
SETTINGS: dict[str, dict[str, Any]] = {
    "shipped: every 2nd round, background": {},
    "every 2nd round, in line": {"eval.background": False},
    "every round, in line": {"eval.every": 1, "eval.background": False},
    "shipped + train.micro-batch-size=4": {"train.micro-batch-size": 4},
}


IMPORTS = "torch, transformers, peft, bitsandbytes, datasets, flwr_datasets, flwr, ray"


def import_footprint() -> float:
    """Resident MiB of a fresh interpreter that has imported what each Pollen process imports."""
    code = f"import {IMPORTS}\nprint(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return int(done.stdout.strip().splitlines()[-1]) / 1024


def run_plain(model: Path, data: Path) -> dict[str, float]:
    """The plain loop in its own process, so its peak memory is its own."""
    args = [str(model), str(data), str(PLAIN_STEPS), str(SHAPE["train.batch-size"])]
    args += [str(SHAPE["train.max-seq-len"]), str(SHAPE["lora.rank"]), str(LR)]
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plain_loop.py"), *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_pollen(name: str, overrides: dict[str, Any], rounds: int, scratch: Path) -> dict[str, Any]:
    """`flwr run .` with ``overrides``, its process tree sampled: metrics rows, wall seconds, memory."""
    from scripts.flower_run import flwr_run, read_metrics

    run_name = "".join(c if c.isalnum() else "-" for c in name).strip("-")
    home = scratch / f"home-{run_name}"
    config = {**overrides, "num-server-rounds": rounds, "output.dir": str(scratch)}
    config["output.run-name"] = run_name
    memory = TreeMemory(str(home)).start()
    try:
        result = flwr_run(home, config, num_supernodes=NUM_NODES, timeout=3600)
    finally:
        memory.stop()
    metrics = scratch / run_name / "metrics.jsonl"
    if not metrics.is_file() or len(read_metrics(scratch / run_name)) != rounds:
        raise RuntimeError(f"{name} did not finish:\n" + result.output[-3000:])
    return {
        "rows": read_metrics(scratch / run_name),
        "wall": result.seconds,
        "peak_total": memory.peak_total,
        "peaks": dict(memory.peaks),
        "counts": dict(memory.counts),
    }


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def _cell(value: Any, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render(
    command: str,
    load: float | None,
    parameters: int,
    plain: dict[str, float],
    runs: dict[str, dict[str, Any]],
    imports: float,
) -> str:
    """The docs section: round, fit and evaluation against the plain loop, memory per process."""
    base = plain["seconds"]
    lines = [
        "## Round cost: a round against its training alone, and the memory of the process tree",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shape: a {parameters / 1e6:.2f}M-parameter Llama (benchmarks/round_shape.py) in 4-bit NF4, a "
        f"{NUM_ROWS}-row Alpaca file, {NUM_NODES} simulated nodes, 2 train per round, 10 local steps of "
        "16 x 256 tokens, LoRA r=32 on q_proj,v_proj, iid partitions, 200 held-out examples, 12 new tokens. "
        f"The plain loop (benchmarks/plain_loop.py: transformers + PEFT + bitsandbytes, no Flower) trains "
        f"the same {PLAIN_STEPS} steps in **{base:.1f} s** and peaks at "
        f"{plain['peak_rss_mb'] / 1024:.2f} GiB. "
        "A steady round is the median of rounds 2 and later; fit is send, train on both nodes, aggregate.",
        "",
        "| evaluation | steady round | / plain | fit | / plain | evaluation (own thread) | whole run "
        "| peak RSS, process tree |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, run in runs.items():
        steady = run["rows"][1:]
        whole, fit = _median(steady, "round_seconds"), _median(steady, "fit_seconds")
        evaluation = _median(run["rows"], "eval_seconds")
        lines.append(
            f"| {name} | {whole:.1f} s | {whole / base:.2f}x | {fit:.1f} s | {fit / base:.2f}x "
            f"| {evaluation:.1f} s | {run['wall']:.0f} s | {run['peak_total'] / MIB / 1024:.2f} GiB |"
        )
    lines += [
        "",
        "Peak RSS of each process of the run, in MiB, for the largest process of each role (how many "
        f"there were; processes under 10 MiB left out). A fresh interpreter that imports {IMPORTS}, as "
        f"the ServerApp and the node actor each do, holds {imports:.0f} MiB before it loads anything.",
        "",
    ]
    roles = sorted({role for run in runs.values() for role, rss in run["peaks"].items() if rss >= 10 * MIB})
    lines.append("| process | " + " | ".join(runs) + " |")
    lines.append("|---|" + "---:|" * len(runs))
    for role in roles:
        cells = [
            f"{run['peaks'][role] / MIB:.0f} ({run['counts'][role]})" if role in run["peaks"] else "–"
            for run in runs.values()
        ]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines += ["", "Per round (seconds; the loss is the server's held-out loss):", ""]
    header = "| round | " + " | ".join(f"{n}: eval_loss / train_loss / round / fit" for n in runs) + " |"
    lines += [header, "|---:|" + "---|" * len(runs)]
    for index in range(len(next(iter(runs.values()))["rows"])):
        cells = []
        for run in runs.values():
            r = run["rows"][index]
            cells.append(
                f"{_cell(r.get('eval_loss'), 4)} / {_cell(r.get('train_loss'), 4)} / "
                f"{r['round_seconds']:.1f} / {r['fit_seconds']:.1f}"
            )
        lines.append(f"| {index + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="federated rounds per run (>= 3)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave the docs alone")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config override (TOML value) for every Pollen run, e.g. --set train.micro-batch-size=8",
    )
    parser.add_argument("--only", choices=sorted(SETTINGS), help="run this evaluation setting alone")
    args = parser.parse_args()
    if args.rounds < 3:
        parser.error(f"--rounds={args.rounds}: at least 3 rounds are needed for a steady round")
    extra: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE, e.g. train.micro-batch-size=8")
        extra[key.strip()] = tomllib.loads(f"v = {value}")["v"]
    settings = {args.only: SETTINGS[args.only]} if args.only else SETTINGS
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="pollen-round-cost-") as tmp:
        scratch = Path(tmp)
        model = build_model(scratch / "model")
        data = write_alpaca_file(scratch / "alpaca.json", NUM_ROWS)
        print(f"plain loop: {PLAIN_STEPS} steps", flush=True)
        plain = run_plain(model, data)
        print(f"plain loop: {plain['seconds']:.1f} s, {plain['peak_rss_mb']:.0f} MiB", flush=True)
        shape = {**SHAPE, "model.name": str(model), "task.data-path": str(data), **extra}
        runs = {}
        for name, overrides in settings.items():
            print(f"pollen, evaluation {name}: {args.rounds} rounds on {NUM_NODES} nodes", flush=True)
            runs[name] = run_pollen(name, {**shape, **overrides}, args.rounds, scratch)
            peak = runs[name]["peak_total"] / MIB
            print(f"  {runs[name]['wall']:.0f} s, tree peak {peak:.0f} MiB", flush=True)
            roles = sorted(runs[name]["peaks"].items(), key=lambda item: -item[1])
            print("  " + ", ".join(f"{role} {rss / MIB:.0f}" for role, rss in roles), flush=True)
        parameters = parameter_count(model)
    command = "python benchmarks/round_cost.py" + ("" if args.rounds == 5 else f" --rounds {args.rounds}")
    command += "".join(f" --set {item}" for item in args.set)
    command += f" --only {args.only!r}" if args.only else ""
    section = render(command, load, parameters, plain, runs, import_footprint())
    print(section)
    if not args.no_write:
        write_section("round-cost", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
