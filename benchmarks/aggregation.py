"""Time one round of the server's aggregation math at Llama-2-7B shapes; write docs/BENCHMARKS.md.

Scenario: q_proj and v_proj of 32 layers (64 modules of 4096x4096), 8 nodes of ranks 4,4,8,8,16,16,32,64,
random factors, weights proportional to random numbers of examples. FlexLoRA is timed twice: through the
low-rank route Pollen uses (two thin QRs and a small SVD per module) and through the dense route (form the
4096x4096 sum, ``torch.linalg.svd``) on a few modules, scaled to 64.

Usage (from the repository root, with Pollen installed): ``python benchmarks/aggregation.py``.
``--quick`` runs a small scenario for smoke tests and only prints, unless ``--docs`` is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.report import DOCS, load_average, machine_line, write_section  # noqa: E402
from pollen.adapter import Adapter, LoraFactors  # noqa: E402
from strategies.math.fedavg import average_factors, normalize_weights  # noqa: E402
from strategies.math.ffa import ffa_aggregate  # noqa: E402
from strategies.math.flexlora import lowrank_svd  # noqa: E402
from strategies.math.flora import stack_factors  # noqa: E402
from strategies.math.projection import adapter_from_svd, project_to_rank  # noqa: E402
from strategies.math.zeropad import zeropad_aggregate  # noqa: E402

T = TypeVar("T")
MAX_PRODUCT_DIFFERENCE = 1e-4  # low-rank vs dense FlexLoRA, relative Frobenius norm
TARGET_SECONDS = 5.0
TARGET_SPEEDUP = 50.0


@dataclass(frozen=True)
class Scenario:
    """Model shapes and federation of one benchmark run."""

    num_layers: int  # each contributes a q_proj and a v_proj
    features: int  # in_features == out_features of every adapted projection
    node_ranks: tuple[int, ...]
    dense_modules: int  # modules timed through the dense SVD route, then scaled to all modules
    repeats: int  # runs of each timed step; the median is reported
    check_targets: bool  # the acceptance targets are stated for the full Llama-2-7B scenario only
    alpha: float = 16.0
    equal_rank: int = 16  # FedAvg needs equal ranks: every node at this rank

    @property
    def num_modules(self) -> int:
        return 2 * self.num_layers

    @property
    def module_names(self) -> list[str]:
        return [
            f"model.layers.{layer}.self_attn.{proj}"
            for layer in range(self.num_layers)
            for proj in ("q_proj", "v_proj")
        ]


FULL = Scenario(
    num_layers=32,
    features=4096,
    node_ranks=(4, 4, 8, 8, 16, 16, 32, 64),
    dense_modules=2,
    repeats=3,
    check_targets=True,
)
QUICK = Scenario(
    num_layers=2,
    features=512,
    node_ranks=(4, 4, 8, 8, 16, 16, 32, 64),
    dense_modules=1,
    repeats=1,
    check_targets=False,
)


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    method: str
    work: str
    modules_timed: str
    seconds: Timing  # per round, for all modules of the scenario


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds, and CPU seconds of this process (all threads): the CPU time barely changes
    when other jobs share the cores, so it shows the cost on an idle machine."""

    wall: float
    cpu: float

    def __add__(self, other: Timing) -> Timing:
        return Timing(self.wall + other.wall, self.cpu + other.cpu)

    def __mul__(self, factor: float) -> Timing:
        return Timing(self.wall * factor, self.cpu * factor)


def random_updates(scenario: Scenario, ranks: Sequence[int], seed: int) -> list[Adapter]:
    """One adapter per node: A like PEFT's init, B as after a little training; scale alpha / rank."""
    generator = torch.Generator().manual_seed(seed)
    bound = scenario.features**-0.5
    updates: list[Adapter] = []
    for rank in ranks:
        adapter: Adapter = {}
        for name in scenario.module_names:
            a = (torch.rand((rank, scenario.features), generator=generator) * 2 - 1) * bound  # (rank, in)
            b = torch.randn((scenario.features, rank), generator=generator) * 0.01  # (out, rank)
            adapter[name] = LoraFactors(a=a, b=b, scale=scenario.alpha / rank)
        updates.append(adapter)
    return updates


def shared_a_updates(updates: Sequence[Adapter]) -> list[Adapter]:
    """FFA-LoRA inputs: every node's A replaced by a prefix of the largest-rank node's A."""
    largest = max(range(len(updates)), key=lambda k: next(iter(updates[k].values())).rank)
    return [
        {
            name: LoraFactors(a=updates[largest][name].a[: pair.rank], b=pair.b, scale=pair.scale)
            for name, pair in update.items()
        }
        for update in updates
    ]


def time_call(step: Callable[[], T]) -> tuple[Timing, T]:
    """Wall and CPU time of one run of ``step``, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    return Timing(time.perf_counter() - wall, time.process_time() - cpu), result


def median_seconds(step: Callable[[], object], repeats: int) -> Timing:
    """Median wall time (and the CPU time of that run) over ``repeats`` runs of ``step``."""
    runs = sorted((time_call(step)[0] for _ in range(repeats)), key=lambda t: t.wall)
    return runs[len(runs) // 2]


def dense_flexlora(
    updates: Sequence[Adapter], fractions: Sequence[float], name: str, rank: int
) -> torch.Tensor:
    """The dense route for one module: form ``W = sum_k p_k s_k B_k A_k``, take its full thin SVD.

    Returns the rank-``rank`` truncation in float64, to compare with the low-rank route.
    """
    pairs = [update[name] for update in updates]
    dense = torch.zeros(pairs[0].b.shape[0], pairs[0].a.shape[1])  # (out_features, in_features)
    for pair, fraction in zip(pairs, fractions, strict=True):
        dense.addmm_(pair.b, pair.a, alpha=fraction * pair.scale)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)  # (out, n), (n,), (n, in)
    return (u[:, :rank].double() * s[:rank].double()) @ vh[:rank].double()  # (out_features, in_features)


def time_fedavg(scenario: Scenario, weights: Sequence[float]) -> Row:
    """FedAvg needs equal ranks, so it gets its own federation with every node at ``equal_rank``."""
    equal = random_updates(scenario, [scenario.equal_rank] * len(weights), seed=2)
    seconds = median_seconds(lambda: average_factors(equal, weights), scenario.repeats)
    work = f"average A and B of {len(weights)} rank-{scenario.equal_rank} updates"
    return Row("FedAvg (FedIT)", work, str(scenario.num_modules), seconds)


def time_zeropad(scenario: Scenario, updates: Sequence[Adapter], weights: Sequence[float]) -> list[Row]:
    """Zero-padding, plain and norm-weighted, and the per-node truncation that follows it."""
    modules, repeats = str(scenario.num_modules), scenario.repeats
    ranks = ",".join(str(r) for r in scenario.node_ranks)
    top = max(scenario.node_ranks)
    plain = median_seconds(lambda: zeropad_aggregate(updates, weights), repeats)
    weighted = median_seconds(lambda: zeropad_aggregate(updates, weights, norm_weighted=True), repeats)
    padded = zeropad_aggregate(updates, weights)
    per_node = median_seconds(
        lambda: [project_to_rank(padded, r, scenario.alpha, "truncate") for r in scenario.node_ranks], repeats
    )
    return [
        Row("Zero-padding (HetLoRA)", f"pad ranks {ranks} to {top}, average", modules, plain),
        Row(
            "Zero-padding, norm-weighted",
            "same, weights x Frobenius norm of s B A (no dense product)",
            modules,
            weighted,
        ),
        Row(
            "Zero-padding, per-node truncation",
            f"{len(weights)} node adapters from the global",
            modules,
            per_node,
        ),
    ]


def time_flora_and_ffa(scenario: Scenario, updates: Sequence[Adapter], weights: Sequence[float]) -> list[Row]:
    """FLoRA stacking, and FFA-LoRA on the same B's with every A a prefix of one shared A."""
    modules, repeats = str(scenario.num_modules), scenario.repeats
    stacking = median_seconds(lambda: stack_factors(updates, weights), repeats)
    ffa_updates = shared_a_updates(updates)
    ffa = median_seconds(lambda: ffa_aggregate(ffa_updates, weights), repeats)
    return [
        Row(
            "FLoRA stacking", f"concatenate to rank {sum(scenario.node_ranks)} (exact sum)", modules, stacking
        ),
        Row("FFA-LoRA", "check shared A, pad and average B", modules, ffa),
    ]


def time_flexlora(
    scenario: Scenario, updates: Sequence[Adapter], weights: Sequence[float]
) -> tuple[list[Row], dict[str, float]]:
    """FlexLoRA through the low-rank route (all modules) and the dense route (a few modules, scaled)."""
    modules, repeats, nodes = str(scenario.num_modules), scenario.repeats, len(weights)
    rank_sum, top = sum(scenario.node_ranks), max(scenario.node_ranks)
    # The server needs components up to the largest node rank only.
    svd_seconds = median_seconds(lambda: lowrank_svd(updates, weights, max_rank=top), repeats)
    svds = lowrank_svd(updates, weights, max_rank=top)
    per_node = median_seconds(
        lambda: [adapter_from_svd(svds, r, scenario.alpha) for r in scenario.node_ranks], repeats
    )
    lowrank_seconds = svd_seconds + per_node

    fractions = normalize_weights(weights, nodes)
    subset = scenario.module_names[: scenario.dense_modules]
    dense_time, differences = Timing(0.0, 0.0), []
    for name in subset:
        timing, dense_product = time_call(partial(dense_flexlora, updates, fractions, name, top))
        dense_time = dense_time + timing
        gap = svds[name].product(top).double() - dense_product
        differences.append(float(torch.linalg.norm(gap) / torch.linalg.norm(dense_product)))
    scale_up = scenario.num_modules / len(subset)
    dense_seconds = dense_time * scale_up + per_node
    size = f"{scenario.features}x{scenario.features}"
    rows = [
        Row(
            "FlexLoRA, low-rank SVD",
            f"stack, 2 thin QRs, {rank_sum}x{rank_sum} SVD, keep top {top}",
            modules,
            svd_seconds,
        ),
        Row("FlexLoRA, per-node factors", f"{nodes} node adapters from the shared SVD", modules, per_node),
        Row("**FlexLoRA, low-rank route, total**", "one round, all nodes", modules, lowrank_seconds),
        Row(
            "**FlexLoRA, dense route, total**",
            f"form the {size} sum + torch.linalg.svd, then {nodes} node adapters",
            f"{len(subset)}, scaled x{scale_up:g}",
            dense_seconds,
        ),
    ]
    comparison = {
        "lowrank_seconds": lowrank_seconds.wall,
        "lowrank_cpu_seconds": lowrank_seconds.cpu,
        "dense_seconds": dense_seconds.wall,
        "speedup": dense_seconds.wall / lowrank_seconds.wall,
        "cpu_speedup": dense_seconds.cpu / lowrank_seconds.cpu,
        "max_difference": max(differences),
        "compared_rank": float(top),
        "dense_modules": float(len(subset)),
    }
    return rows, comparison


def run(scenario: Scenario) -> tuple[list[Row], dict[str, float]]:
    """Time every method on ``scenario``; return table rows and the FlexLoRA comparison numbers."""
    nodes = len(scenario.node_ranks)
    examples = torch.randint(100, 5000, (nodes,), generator=torch.Generator().manual_seed(1))
    weights = [float(n) for n in examples]  # numbers of examples; each function normalises them
    updates = random_updates(scenario, scenario.node_ranks, seed=0)
    rows = [time_fedavg(scenario, weights)]
    rows += time_zeropad(scenario, updates, weights)
    rows += time_flora_and_ffa(scenario, updates, weights)
    flex_rows, comparison = time_flexlora(scenario, updates, weights)
    return rows + flex_rows, comparison


def render(
    scenario: Scenario,
    rows: Sequence[Row],
    comparison: dict[str, float],
    command: str,
    load_before: float | None,
) -> str:
    """The markdown section, markers excluded."""
    ranks = ",".join(str(r) for r in scenario.node_ranks)
    lines = [
        "## Aggregation math (server side, one round)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load_before)}.",
        "",
        f"Scenario: Llama-2-7B shapes, q_proj and v_proj of {scenario.num_layers} layers "
        f"({scenario.num_modules} modules, {scenario.features}x{scenario.features} each); "
        f"{len(scenario.node_ranks)} nodes of ranks {ranks}, lora_alpha {scenario.alpha:g} "
        "(scale alpha/rank); "
        "random factors; weights proportional to random numbers of examples. "
        f"Times are medians of {scenario.repeats} run(s), float32 factors, torch threads as in Machine.",
        "",
        "| method | what is timed | modules timed | wall s per round, all modules | CPU s (all threads) |",
        "|---|---|---|---:|---:|",
    ]
    lines += [
        f"| {r.method} | {r.work} | {r.modules_timed} | {r.seconds.wall:.3f} | {r.seconds.cpu:.3f} |"
        for r in rows
    ]
    speed_ok = comparison["lowrank_seconds"] <= TARGET_SECONDS
    ratio_ok = comparison["speedup"] >= TARGET_SPEEDUP
    diff_ok = comparison["max_difference"] < MAX_PRODUCT_DIFFERENCE
    lines += [
        "",
        f"FlexLoRA: the low-rank route is **{comparison['speedup']:.0f}x** faster than the dense route "
        f"in wall time ({comparison['cpu_speedup']:.0f}x in CPU time) "
        f"(dense time measured on {comparison['dense_modules']:g} module(s) and scaled to "
        f"{scenario.num_modules}). Max relative Frobenius difference of the "
        f"rank-{comparison['compared_rank']:g} products between the routes on the timed modules: "
        f"{comparison['max_difference']:.2e} "
        f"(must be < {MAX_PRODUCT_DIFFERENCE:g}: {'met' if diff_ok else 'NOT met'}).",
        "",
    ]
    if scenario.check_targets:
        lines.append(
            f"Targets: low-rank FlexLoRA <= {TARGET_SECONDS:g} s per round: "
            f"{'met' if speed_ok else 'NOT met'}; >= {TARGET_SPEEDUP:g}x faster than dense: "
            f"{'met' if ratio_ok else 'NOT met'}. Both are judged on wall time; the CPU time of the low-rank "
            f"route, summed over torch's threads, was {comparison['lowrank_cpu_seconds']:.2f} s."
        )
    else:
        lines.append("Targets apply to the full scenario and are not checked in this smoke run.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small scenario for smoke tests; prints only")
    parser.add_argument("--docs", type=Path, default=None, help=f"markdown file to update (default {DOCS})")
    args = parser.parse_args(argv)
    scenario = QUICK if args.quick else FULL
    load_before = load_average()
    rows, comparison = run(scenario)
    # Thread settings from the environment change the timings, so they are part of the recorded command.
    env = "".join(f"{k}={os.environ[k]} " for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    command = env + "python benchmarks/aggregation.py" + "".join(" " + arg for arg in sys.argv[1:])
    section = render(scenario, rows, comparison, command, load_before)
    print(section)
    docs = args.docs if args.docs is not None else (None if args.quick else DOCS)
    if docs is not None:
        write_section("aggregation", section, docs)
        print(f"\nwrote {docs}")
    return 0 if comparison["max_difference"] < MAX_PRODUCT_DIFFERENCE else 1


if __name__ == "__main__":
    sys.exit(main())
