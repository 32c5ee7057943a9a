"""Bytes on the wire against learning: the default federation at every wire setting, same seeds.

Usage: python benchmarks/wire.py [--rounds 10] [--only NAME ...]

Each setting runs `flwr run .` with the shipped configuration (10 simulated nodes) and only the wire
keys changed; bytes are the measured serialized sizes summed over all rounds, both directions.
Writes the "wire" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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
            "wire.uplink-bits": self.uplink,
            "wire.downlink-bits": self.downlink,
            "wire.scheme": self.scheme,
            "wire.error-feedback": self.error_feedback,
        }


SETTINGS = (
    Setting("fp32", 32, 32),
    Setting("fp16", 16, 16),
    Setting("int8-ef", 8, 8),
    Setting("int4-ef", 4, 4),
    Setting("nf4-ef", 4, 4, scheme="nf4"),
    Setting("int4-no-ef", 4, 4, error_feedback=False),
    Setting("int4-up-only-ef", 4, 32),
)


@dataclass(frozen=True)
class Outcome:
    setting: Setting
    total_bytes: int
    eval_loss: float
    exact_match: float
    seconds: float


def run(setting: Setting, rounds: int) -> Outcome:
    rows, seconds = run_federation(setting.name, setting.overrides(), rounds, NUM_NODES)
    total = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    return Outcome(setting, total, rows[-1]["eval_loss"], rows[-1]["exact_match"], seconds)


MAX_BYTES_RATIO = 0.14  # 4-bit both ways with error feedback, against the fp32 run
MAX_LOSS_CHANGE = {4: 0.02, 8: 0.005}  # final eval loss against the fp32 run, by bit width


def checks(outcomes: list[Outcome]) -> list[str]:
    """The issue's acceptance lines, judged on the settings that ran."""
    by_name = {o.setting.name: o for o in outcomes}
    reference = by_name.get("fp32")
    if reference is None:
        return []
    lines = []
    for name, bits in (("int4-ef", 4), ("int8-ef", 8)):
        outcome = by_name.get(name)
        if outcome is None:
            continue
        change = outcome.eval_loss / reference.eval_loss - 1
        loss_ok = abs(change) <= MAX_LOSS_CHANGE[bits]
        line = (
            f"- {name}: final eval loss {100 * change:+.2f}% against fp32 (within "
            f"{100 * MAX_LOSS_CHANGE[bits]:.1f}%: {'met' if loss_ok else 'NOT met'})"
        )
        if bits == 4:
            ratio = outcome.total_bytes / reference.total_bytes
            verdict = "met" if ratio <= MAX_BYTES_RATIO else "NOT met"
            line += f"; total bytes {ratio:.3f}x fp32 (at most {MAX_BYTES_RATIO}x: {verdict})"
        lines.append(line + ".")
    return lines


def render(command: str, load: float | None, outcomes: list[Outcome], rounds: int) -> str:
    by_name = {o.setting.name: o for o in outcomes}
    reference = by_name.get("fp32")
    lines = [
        "## Quantized wire: bytes against learning",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shipped configuration, {NUM_NODES} simulated nodes, {rounds} rounds, seed 0 for every setting; "
        "bytes are serialized record sizes summed over all rounds and both directions (training and "
        "federated evaluation messages). Block size 64.",
        "",
        "| setting | uplink bits | downlink bits | scheme | error feedback | total MB | x fp32 bytes "
        "| final eval loss | vs fp32 loss | exact match | wall s |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        s = o.setting
        ratio = f"{o.total_bytes / reference.total_bytes:.3f}" if reference else "n/a"
        loss_change = f"{100 * (o.eval_loss / reference.eval_loss - 1):+.2f}%" if reference else "n/a"
        lines.append(
            f"| {s.name} | {s.uplink} | {s.downlink} | {s.scheme} | {'yes' if s.error_feedback else 'no'} "
            f"| {o.total_bytes / 1e6:.2f} | {ratio} | {o.eval_loss:.4f} | {loss_change} "
            f"| {o.exact_match:.3f} "
            f"| {o.seconds:.0f} |"
        )
    verdicts = checks(outcomes)
    if verdicts:
        lines += ["", "Checks:", *verdicts]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="rounds per setting (the target needs >= 10)")
    parser.add_argument("--only", nargs="*", default=None, help="names of settings to run (default: all)")
    args = parser.parse_args()
    known = {s.name: s for s in SETTINGS}
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"--only {unknown}: known settings are {', '.join(known)}")
    chosen = [known[n] for n in args.only] if args.only else list(SETTINGS)
    load = load_average()
    outcomes = []
    for setting in chosen:
        print(f"running {setting.name} ({args.rounds} rounds)", flush=True)
        outcomes.append(run(setting, args.rounds))
        print(f"  {outcomes[-1]}", flush=True)
    command = "python benchmarks/wire.py" + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
    if args.only:
        command += " --only " + " ".join(args.only)
    section = render(command, load, outcomes, args.rounds)
    print(section)
    write_section("wire", section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
