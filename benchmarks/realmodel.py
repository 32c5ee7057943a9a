"""Learning on a real model: SmolLM2-135M-Instruct in 4-bit on the synthetic skills, chat format.

Usage: python benchmarks/realmodel.py [--nodes 4] [--rounds 5] [--local-steps 10] [--lr 0.003]
       [--num-eval 96] [--max-new-tokens 10]

Rows, all judged on the server's held-out examples with the server's own evaluator
(server_app/evaluation.py: response-token loss and exact match of greedy answers):
- zero-shot: the base model as it comes (a fresh adapter, whose B factors are zero);
- centralized: one rank-8 adapter trained on the union of the node partitions for as many steps as
  the whole federation trains (rounds x nodes per round x local steps);
- local-only: each node trains a rank-8 adapter on its own partition for rounds x local steps; the
  mean over nodes;
- fedavg at rank 8, and flora with ranks 2,4,8,16 by partition (strategy.rank-plan), both on a 4-bit
  wire in both directions (absmax, block 64) with error feedback on the uplink.
The federation runs in this process with the real strategies' math (``project`` and ``combine``
hooks) and the real wire codec; a node's round is the ClientApp's: receive, write the adapter,
train ``local-steps`` steps, send the encoded delta. Everything shares one 4-bit base, as a simulation
actor does. Writes the "realmodel" section of docs/BENCHMARKS.md after every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.node_memory import MIB, peak_mib, reset_peak  # noqa: E402
from benchmarks.report import load_average, machine_line, write_section  # noqa: E402
from scripts.flower_run import shipped_run_config  # noqa: E402

BASELINE_RANK = 8
MIXED_RANKS = (2, 4, 8, 16)
NODES_PER_ROUND = 2
WIRE_BITS = 4


@dataclass
class RowResult:
    name: str
    ranks: str
    wire: str
    eval_loss: float
    exact_match: float
    step_seconds: list[float] = field(default_factory=list)
    train_peak_mib: float = 0.0  # resident high-water mark of the process while this row trained
    seconds: float = 0.0
    uplink_bytes: int = 0
    node_figures: list[tuple[float, float]] = field(default_factory=list)  # local-only: per node


@dataclass(frozen=True)
class Shape:
    nodes: int
    rounds: int
    local_steps: int
    lr: float
    num_eval: int
    max_new_tokens: int
    batch_size: int
    seed: int

    @property
    def federation_steps(self) -> int:
        return self.rounds * NODES_PER_ROUND * self.local_steps


class Bench:
    """One 4-bit SmolLM2 in the ClientApp's worker, the node partitions, and the server's evaluator."""

    def __init__(self, shape: Shape) -> None:
        from client_app.worker import tokenize_rows, worker_on
        from pollen.config import parse_run_config
        from pollen.model import load_base_model
        from pollen.protocol import knobs_for
        from server_app.evaluation import Evaluator
        from tasks.data import held_out, node_data
        from tasks.embedded import resolve_model_name
        from tasks.prompts import format_response, resolve_prompt_format

        self.shape = shape
        overrides = {
            "model.name": "smollm2-135m",
            "task.num-eval": shape.num_eval,
            "task.max-new-tokens": shape.max_new_tokens,
            "train.batch-size": shape.batch_size,
            "seed": shape.seed,
        }
        self.cfg = parse_run_config({**shipped_run_config(), **overrides})
        base: Any = load_base_model(resolve_model_name(self.cfg.model.name), self.cfg.model)
        self.footprint_nf4 = base.get_memory_footprint() / MIB
        self.worker = worker_on(base, self.cfg)  # the ClientApp's worker: host, tokenizer, device
        self.host, self.tokenizer = self.worker.host, self.worker.tokenizer
        self.prompt = resolve_prompt_format(self.cfg.task.prompt_format, self.tokenizer)
        # The knobs the server sends, with this benchmark's learning rate; local steps vary by row.
        self.knobs = replace(knobs_for(self.cfg, BASELINE_RANK), lr=shape.lr)
        self.host.activate(BASELINE_RANK)
        self.initial = {rank: self._fresh(rank) for rank in sorted({BASELINE_RANK, *MIXED_RANKS})}
        eval_rows = list(held_out(self.cfg.task, self.cfg.seed))
        self.evaluate = Evaluator(
            host=self.host,
            tokenizer=self.tokenizer,
            examples=tokenize_rows(
                self.worker, eval_rows, self.cfg.train.max_seq_len, self.cfg.task.prompt_format
            ),
            references=[format_response(row) for row in eval_rows],
            metric="exact",
            max_new_tokens=shape.max_new_tokens,
            prompt=self.prompt,
        )
        self.partitions = [
            node_data(self.cfg.task, p, shape.nodes, self.cfg.seed)[0] for p in range(shape.nodes)
        ]

    def _fresh(self, rank: int) -> Any:
        self.host.activate(rank)
        return self.host.read()

    def score(self, adapter: Any) -> tuple[float, float]:
        """(eval loss, exact match) of ``adapter`` (any rank) on the held-out set."""
        figures = self.evaluate(adapter)
        loss, match = figures["eval_loss"], figures["exact_match"]
        if loss is None or match is None:
            raise ValueError("the held-out set has no example with a response token")
        return loss, match

    def train(self, adapter: Any, train_set: Any, steps: int, seed: int, row: RowResult) -> Any:
        """The ClientApp's local training of ``adapter`` (its rank) on ``train_set``; the trained adapter."""
        from client_app.worker import train_from

        rank = next(iter(adapter.values())).rank
        knobs = replace(self.knobs, rank=rank, local_steps=steps)
        clock = StepClock()
        train_from(self.worker, adapter, knobs, train_set, seed, self.cfg.task.prompt_format, clock.tick)
        clock.stop()
        row.train_peak_mib = max(row.train_peak_mib, peak_mib())
        row.step_seconds += clock.step_seconds()
        return self.host.read()


class StepClock:
    """Notes when each training step asks for its batch; the first one also resets the memory peak."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def tick(self) -> None:
        if not self.stamps:
            reset_peak()  # the peak of this row's training, not of loading or tokenizing
        self.stamps.append(time.perf_counter())

    def stop(self) -> None:
        """The end of the last step."""
        self.stamps.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


def run_zero_shot(bench: Bench) -> RowResult:
    started = time.monotonic()
    loss, match = bench.score(bench.initial[BASELINE_RANK])
    return RowResult("zero-shot (base model)", "-", "-", loss, match, seconds=time.monotonic() - started)


def run_centralized(bench: Bench) -> RowResult:
    from datasets import concatenate_datasets

    started = time.monotonic()
    row = RowResult("centralized", str(BASELINE_RANK), "-", 0.0, 0.0)
    union = concatenate_datasets(bench.partitions)
    trained = bench.train(
        bench.initial[BASELINE_RANK], union, bench.shape.federation_steps, bench.cfg.seed, row
    )
    row.eval_loss, row.exact_match = bench.score(trained)
    row.seconds = time.monotonic() - started
    return row


def run_local_only(bench: Bench) -> RowResult:
    started = time.monotonic()
    row = RowResult(f"local-only (mean of {bench.shape.nodes} nodes)", str(BASELINE_RANK), "-", 0.0, 0.0)
    steps = bench.shape.rounds * bench.shape.local_steps
    for partition, train_set in enumerate(bench.partitions):
        trained = bench.train(bench.initial[BASELINE_RANK], train_set, steps, bench.cfg.seed + partition, row)
        row.node_figures.append(bench.score(trained))
        print(
            f"  local-only node {partition}: eval_loss {row.node_figures[-1][0]:.4f}, "
            f"EM {row.node_figures[-1][1]:.3f}",
            flush=True,
        )
    row.eval_loss = statistics.fmean(f[0] for f in row.node_figures)
    row.exact_match = statistics.fmean(f[1] for f in row.node_figures)
    row.seconds = time.monotonic() - started
    return row


def run_federated(bench: Bench, strategy_name: str, ranks: tuple[int, ...]) -> RowResult:
    """``rounds`` rounds of the real strategy's math over a 4-bit wire, nodes sampled as the server does."""
    import random

    import torch

    from client_app.worker import node_seed
    from pollen.adapter import flatten, subtract, unflatten
    from pollen.codec import WireSpec, decode, encode, serialized_nbytes
    from pollen.error_feedback import compensate, new_residual
    from strategies.base import StrategySettings
    from strategies.registry import build_strategy
    from strategies.replies import NodeUpdate, rank_scale
    from strategies.sampling import sample_size

    started = time.monotonic()
    shape, cfg = bench.shape, bench.cfg
    spec = WireSpec(bits=WIRE_BITS, scheme="absmax", block_size=cfg.wire.block_size)
    settings = StrategySettings(
        fraction_train=NODES_PER_ROUND / shape.nodes,
        fraction_evaluate=0.0,
        min_nodes=NODES_PER_ROUND,
        alpha=cfg.lora.alpha,
        global_rank=BASELINE_RANK,
        fingerprint=bench.host.fingerprint,
        downlink=spec,
        seed=cfg.seed,
        downlink_feedback=False,  # every round sends the whole adapter (see the section's notes)
        ffa_lr_multiplier=cfg.strategy.ffa_lr_multiplier,
    )
    strategy = build_strategy(strategy_name, settings)
    node_rank = {p: ranks[p % len(ranks)] for p in range(shape.nodes)}
    label = ",".join(map(str, ranks))
    row = RowResult(f"{strategy_name}, 4-bit wire", label, f"{WIRE_BITS}-bit", 0.0, 0.0)
    global_adapter = strategy.initial_global(
        bench.initial[strategy.global_rank(sorted(set(node_rank.values())))]
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    residuals: dict[int, dict[str, torch.Tensor]] = {}
    for server_round in range(1, shape.rounds + 1):
        rng = random.Random(cfg.seed * 1_000_003 + server_round * 2)  # the strategies' seeded draw
        size = sample_size(shape.nodes, settings.fraction_train, settings.min_nodes)
        chosen = sorted(rng.sample(range(shape.nodes), size))
        updates = []
        for partition in chosen:
            rank = node_rank[partition]
            projected = strategy.project(global_adapter, rank)
            sent = unflatten(decode(encode(flatten(projected), spec, generator)), rank_scale(projected))
            trained = bench.train(
                sent,
                bench.partitions[partition],
                shape.local_steps,
                node_seed(cfg.seed, server_round, partition),
                row,
            )
            delta = flatten(subtract(trained, sent))
            residual = residuals.get(partition)
            if residual is not None and residual.keys() == delta.keys():
                to_send = compensate(delta, residual)
            else:
                to_send = compensate(delta, None)
            record = encode(to_send, spec, generator)
            row.uplink_bytes += serialized_nbytes(record)
            received = decode(record)
            residuals[partition] = new_residual(to_send, received)
            updates.append(
                NodeUpdate(
                    node_id=partition,
                    rank=rank,
                    sent=sent,
                    delta=unflatten(received, rank_scale(sent)),
                    weight=float(len(bench.partitions[partition])),
                )
            )
        global_adapter = strategy.combine(global_adapter, updates)
        elapsed = time.monotonic() - started
        print(
            f"  {row.name} round {server_round}/{shape.rounds}: nodes {chosen}, {elapsed:.0f} s", flush=True
        )
    row.eval_loss, row.exact_match = bench.score(global_adapter)
    row.seconds = time.monotonic() - started
    return row


ROWS: tuple[tuple[str, Callable[[Bench], RowResult]], ...] = (
    ("zero-shot", run_zero_shot),
    ("centralized", run_centralized),
    ("local-only", run_local_only),
    ("fedavg-int4", lambda b: run_federated(b, "fedavg", (BASELINE_RANK,))),
    ("flora-int4", lambda b: run_federated(b, "flora", MIXED_RANKS)),
)


def render(
    command: str,
    load: float | None,
    shape: Shape,
    bench: Bench,
    rows: list[RowResult],
    minutes: float,
    fp32_mib: float,
    notes: list[str],
) -> str:
    cfg = bench.cfg
    lines = [
        "## Real model: SmolLM2-135M in 4-bit on the synthetic skills",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}; the whole script took {minutes:.1f} min.",
        "",
        f"SmolLM2-135M-Instruct in 4-bit NF4 (double quantization) on the CPU; base footprint "
        f"{bench.footprint_nf4:.0f} MiB in NF4 against {fp32_mib:.0f} MiB in float32 "
        "(`get_memory_footprint()`). "
        f"Synthetic skills (add, subtract, reverse, sort, lookup) in the model's chat format, "
        f"{shape.nodes} nodes (Dirichlet alpha {cfg.task.alpha} over skills, {cfg.task.num_train} training "
        f"examples in all), {shape.rounds} rounds of {NODES_PER_ROUND} sampled nodes x "
        f"{shape.local_steps} local "
        f"steps, batch {shape.batch_size}, lr {shape.lr}, LoRA alpha {cfg.lora.alpha} on all linear layers, "
        f"train.max-seq-len {cfg.train.max_seq_len}, gradient checkpointing "
        f"{'on' if cfg.train.gradient_checkpointing else 'off'}. "
        f"Judged on {shape.num_eval} held-out examples: "
        f"response-token loss and exact match of greedy answers (up to {shape.max_new_tokens} new tokens), "
        f"with the server's evaluator. Centralized trains {shape.federation_steps} steps (the federation's "
        f"total); local-only {shape.rounds * shape.local_steps} per node. *Peak MiB* is the process's "
        "resident high-water mark while the row trained (model, adapters and the benchmark included).",
        "",
        "| row | ranks | wire | final eval loss | exact match | s per local step (median) | peak MiB "
        "| uplink MB | wall s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        step = f"{statistics.median(r.step_seconds):.2f}" if r.step_seconds else "-"
        peak = f"{r.train_peak_mib:.0f}" if r.train_peak_mib else "-"
        up = f"{r.uplink_bytes / 1e6:.2f}" if r.uplink_bytes else "-"
        lines.append(
            f"| {r.name} | {r.ranks} | {r.wire} | {r.eval_loss:.4f} | {r.exact_match:.3f} | {step} | {peak} "
            f"| {up} | {r.seconds:.0f} |"
        )
    for r in rows:
        if r.node_figures:
            lines += [
                "",
                f"{r.name}, per node (eval loss / exact match): "
                + "; ".join(f"{loss:.3f} / {em:.3f}" for loss, em in r.node_figures)
                + ".",
            ]
    for note in notes:
        lines += ["", note]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--num-eval", type=int, default=96)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", nargs="*", default=None, help=f"rows to run: {', '.join(n for n, _ in ROWS)}"
    )
    args = parser.parse_args()
    shape = Shape(
        args.nodes,
        args.rounds,
        args.local_steps,
        args.lr,
        args.num_eval,
        args.max_new_tokens,
        args.batch_size,
        args.seed,
    )
    defaults = {
        "--nodes": 4,
        "--rounds": 5,
        "--local-steps": 10,
        "--lr": 0.003,
        "--num-eval": 96,
        "--max-new-tokens": 10,
        "--batch-size": 8,
        "--seed": 0,
    }
    command = "python benchmarks/realmodel.py"
    for flag, default in defaults.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value != default:
            command += f" {flag} {value}"
    if args.only:
        command += " --only " + " ".join(args.only)
    load, started = load_average(), time.monotonic()
    print("loading SmolLM2-135M in 4-bit ...", flush=True)
    bench = Bench(shape)
    fp32_mib = _fp32_footprint()
    chosen = [(n, f) for n, f in ROWS if args.only is None or n in args.only]
    done: list[RowResult] = []
    for index, (name, run) in enumerate(chosen, start=1):
        print(
            f"running {name} ({index} of {len(chosen)}), {(time.monotonic() - started) / 60:.1f} min so far",
            flush=True,
        )
        done.append(run(bench))
        r = done[-1]
        print(
            f"  {r.name}: eval_loss {r.eval_loss:.4f}, EM {r.exact_match:.3f}, {r.seconds:.0f} s", flush=True
        )
        notes = [] if index == len(chosen) else [f"Partial: {index} of {len(chosen)} rows done."]
        notes += NOTES
        text = render(command, load, shape, bench, done, (time.monotonic() - started) / 60, fp32_mib, notes)
        write_section("realmodel", text)
    print(text)
    return 0


NOTES = [
    "The federation runs in one process with the strategies' own `project` and `combine` and the real "
    "codec; the downlink resends the whole adapter every round (no downlink views), and the uplink keeps "
    "each node's error-feedback residual while its rank stays the same, as the ClientApp does.",
]


def _fp32_footprint() -> float:
    """float32 footprint of the base, built on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tasks.embedded import resolve_model_name

    config = AutoConfig.from_pretrained(resolve_model_name("smollm2-135m"))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return float(skeleton.get_memory_footprint()) / MIB


if __name__ == "__main__":
    raise SystemExit(main())
