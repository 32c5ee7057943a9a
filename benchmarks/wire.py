"""Bytes on the wire against learning: the default federation at every wire setting, same seeds.

Usage: python benchmarks/wire.py [--rounds 10] [--seeds 0 1 2] [--all-seeds] [--only NAME ...]

Each setting runs `flwr run .` with the shipped configuration (10 simulated nodes) and only the wire
keys (and the seed) changed; bytes are the measured serialized sizes summed over all rounds, both
directions. One seed's trajectory moves by a few percent with any perturbation, so the settings the
acceptance judges (fp32, int8-ef, int4-ef) run once per seed and are compared as means; the others run
on the first seed only, unless --all-seeds.
Writes the "wire" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runlog  # noqa: E402
from benchmarks.report import load_average, machine_line, run_federation, write_section  # noqa: E402

NUM_NODES = 10


@dataclass(frozen=True)
class Setting:
    name: str
    uplink: int
    downlink: int
    scheme: str = "absmax"
    error_feedback: bool = True

    def overrides(self) -> dict[str, Any]:
        return {
            **runlog.EVERY_ROUND,
            "wire.uplink-bits": self.uplink,
            "wire.downlink-bits": self.downlink,
            "wire.scheme": self.scheme,
            "wire.error-feedback": self.error_feedback,
        }


SETTINGS = (  # the three the acceptance judges come first
    Setting("fp32", 32, 32),
    Setting("int8-ef", 8, 8),
    Setting("int4-ef", 4, 4),
    Setting("fp16", 16, 16),
    Setting("nf4-ef", 4, 4, scheme="nf4"),
    Setting("int4-no-ef", 4, 4, error_feedback=False),
    Setting("int4-up-only-ef", 4, 32),
)


@dataclass(frozen=True)
class Outcome:
    """One setting over every seed: per-seed figures, in seed order."""

    setting: Setting
    seeds: tuple[int, ...]
    total_bytes: tuple[int, ...]
    eval_loss: tuple[float, ...]
    exact_match: tuple[float, ...]
    seconds: tuple[float, ...]

    @property
    def mean_bytes(self) -> float:
        return statistics.fmean(self.total_bytes)

    @property
    def mean_loss(self) -> float:
        return statistics.fmean(self.eval_loss)

    @property
    def loss_sd(self) -> float:
        return statistics.stdev(self.eval_loss) if len(self.eval_loss) > 1 else 0.0


def run(setting: Setting, rounds: int, seeds: list[int]) -> Outcome:
    """The default federation at ``setting`` once per seed (run config key ``seed``)."""
    totals, losses, matches, times = [], [], [], []
    for seed in seeds:
        print(f"running {setting.name}, seed {seed} ({rounds} rounds)", flush=True)
        overrides = {**setting.overrides(), "seed": seed}
        rows, seconds = run_federation(f"{setting.name}-s{seed}", overrides, rounds, NUM_NODES)
        totals.append(sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows))
        losses.append(float(rows[-1]["eval_loss"]))
        matches.append(float(rows[-1]["exact_match"]))
        times.append(seconds)
        print(f"  bytes {totals[-1]}, eval loss {losses[-1]:.4f}, exact match {matches[-1]:.3f}", flush=True)
    return Outcome(setting, tuple(seeds), tuple(totals), tuple(losses), tuple(matches), tuple(times))


JUDGED = ("fp32", "int8-ef", "int4-ef")  # the settings the checks compare: every seed by default
MAX_BYTES_RATIO = 0.14  # 4-bit both ways with error feedback, against the fp32 run
MAX_LOSS_CHANGE = {4: 0.02, 8: 0.005}  # final eval loss against the fp32 run, by bit width


def _paired_losses(outcome: Outcome, reference: Outcome) -> list[tuple[float, float]]:
    """(outcome's, reference's) final eval loss for each seed both ran, in the outcome's seed order."""
    theirs = dict(zip(reference.seeds, reference.eval_loss, strict=True))
    return [
        (loss, theirs[seed])
        for seed, loss in zip(outcome.seeds, outcome.eval_loss, strict=True)
        if seed in theirs
    ]


def loss_change(outcome: Outcome, reference: Outcome) -> float:
    """Relative change of the mean final eval loss against the reference's mean on the same seeds."""
    shared = [ref for _, ref in _paired_losses(outcome, reference)]
    return outcome.mean_loss / (statistics.fmean(shared) if shared else reference.mean_loss) - 1


def paired_changes(outcome: Outcome, reference: Outcome) -> list[float]:
    """Per-seed relative changes of the final eval loss, for the seeds both outcomes ran."""
    return [loss / ref - 1 for loss, ref in _paired_losses(outcome, reference)]


def checks(outcomes: list[Outcome]) -> list[str]:
    """The issue's acceptance lines, judged on means over seeds of the settings that ran."""
    by_name = {o.setting.name: o for o in outcomes}
    reference = by_name.get("fp32")
    if reference is None:
        return []
    lines = []
    for name, bits in (("int4-ef", 4), ("int8-ef", 8)):
        outcome = by_name.get(name)
        if outcome is None:
            continue
        change = loss_change(outcome, reference)
        loss_ok = abs(change) <= MAX_LOSS_CHANGE[bits]
        per_seed = ", ".join(f"{100 * c:+.2f}%" for c in paired_changes(outcome, reference))
        line = (
            f"- {name}: mean final eval loss {100 * change:+.2f}% against fp32 (within "
            f"{100 * MAX_LOSS_CHANGE[bits]:.1f}%: {'met' if loss_ok else 'NOT met'}; per seed {per_seed})"
        )
        if bits == 4:
            ratio = outcome.mean_bytes / reference.mean_bytes
            verdict = "met" if ratio <= MAX_BYTES_RATIO else "NOT met"
            line += f"; total bytes {ratio:.3f}x fp32 (at most {MAX_BYTES_RATIO}x: {verdict})"
        lines.append(line + ".")
    return lines


def render(
    command: str, load: float | None, outcomes: list[Outcome], rounds: int, notes: tuple[str, ...] = ()
) -> str:
    """The section: command, machine, the table (means over seeds), the noise floor and the checks."""
    by_name = {o.setting.name: o for o in outcomes}
    reference = by_name.get("fp32")
    seeds = sorted({seed for o in outcomes for seed in o.seeds})
    partly = any(len(o.seeds) < len(seeds) for o in outcomes)
    lines = [
        "## Quantized wire: bytes against learning",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shipped configuration, {NUM_NODES} simulated nodes, {rounds} rounds. Each setting runs once per "
        "seed in its `seeds` column (run config `seed`, which fixes the data split, the sampling, the "
        "initialisation and the training order)"
        + (", the settings the checks judge on every seed, the others on the first only" if partly else "")
        + "; figures are means over those seeds, `sd` the standard deviation over them, and `vs fp32 loss` "
        "compares with fp32's mean on the same seeds. Bytes are serialized record sizes summed over all "
        "rounds and both directions (training and federated evaluation messages), per run. Block size 64.",
        "",
        "| setting | uplink bits | downlink bits | scheme | error feedback | seeds | total MB | x fp32 bytes "
        "| final eval loss (sd) | vs fp32 loss | exact match | wall s |",
        "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        s = o.setting
        ratio = f"{o.mean_bytes / reference.mean_bytes:.3f}" if reference else "n/a"
        change = f"{100 * loss_change(o, reference):+.2f}%" if reference else "n/a"
        lines.append(
            f"| {s.name} | {s.uplink} | {s.downlink} | {s.scheme} | {'yes' if s.error_feedback else 'no'} "
            f"| {','.join(map(str, o.seeds))} | {o.mean_bytes / 1e6:.2f} | {ratio} "
            f"| {o.mean_loss:.4f} ({f'{o.loss_sd:.4f}' if len(o.seeds) > 1 else '-'}) | {change} "
            f"| {statistics.fmean(o.exact_match):.3f} | {statistics.fmean(o.seconds):.0f} |"
        )
    if reference is not None and len(reference.seeds) > 1:
        lines += [
            "",
            "Noise floor: fp32's own final eval loss moves by "
            f"{100 * reference.loss_sd / reference.mean_loss:.1f}% (sd over seeds, relative to its mean) "
            "from seed to seed, with no quantization at all.",
        ]
    if notes:
        lines += ["", *notes]
    verdicts = checks(outcomes)
    if verdicts:
        lines += ["", "Checks:", *verdicts]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per setting (the target needs >= 10)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="run-config seeds (default 0 1 2)"
    )
    parser.add_argument(
        "--all-seeds",
        action="store_true",
        help=f"run every setting on every seed, not only {', '.join(JUDGED)}",
    )
    parser.add_argument("--only", nargs="*", default=None, help="names of settings to run (default: all)")
    args = parser.parse_args()
    known = {s.name: s for s in SETTINGS}
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"--only {unknown}: known settings are {', '.join(known)}")
    if args.rounds < 1 or any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--rounds={args.rounds} --seeds={args.seeds}: need >= 1 round and distinct seeds >= 0")
    chosen = [known[n] for n in args.only] if args.only else list(SETTINGS)
    load = load_average()
    command = "python benchmarks/wire.py" + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
    if args.seeds != [0, 1, 2]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.all_seeds:
        command += " --all-seeds"
    if args.only:
        command += " --only " + " ".join(args.only)
    outcomes: list[Outcome] = []
    for setting in chosen:
        seeds = args.seeds if args.all_seeds or setting.name in JUDGED else args.seeds[:1]
        outcomes.append(run(setting, args.rounds, seeds))
        # Rewritten after every setting, so an interrupted run still leaves what it measured.
        done = len(outcomes) == len(chosen)
        progress = () if done else (f"Partial: {len(outcomes)} of {len(chosen)} settings have run.",)
        write_section("wire", render(command, load, outcomes, args.rounds, progress))
    print(render(command, load, outcomes, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
