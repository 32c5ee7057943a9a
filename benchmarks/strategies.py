"""Learning quality of every strategy on the non-IID default with mixed ranks, at a 32-bit and a 4-bit wire.

Usage: python benchmarks/strategies.py [--rounds 10] [--only ROW ...]

Rows, all on the shipped task (10 nodes, Dirichlet over skills, same seed) and judged on the server's
held-out examples:
- centralized: one rank-8 adapter trained on the union of all node partitions for as many steps as the
  whole federation trains (rounds x nodes sampled per round x local steps): the upper bound;
- local-only: each node trains a rank-8 adapter on its own partition alone for rounds x local steps
  (as if it were sampled every round, which favours this baseline); the mean over nodes;
- fedavg at equal rank 8 (the reference), and zeropad, flora, flexlora and ffa with ranks 2,4,8,16
  cycled over the nodes; each at a 32-bit wire and a 4-bit wire (both directions, error feedback).
Writes the "strategies" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
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
MIXED_RANKS = "2,4,8,16"
BASELINE_RANK = 8
EVAL_BATCH_SIZE = 32
MAX_EM_GAP = 0.03  # a heterogeneous 4-bit strategy must be within 3 exact-match points of fp32 fedavg


@dataclass(frozen=True)
class Row:
    """One line of the table: what ran, how it did, what it sent."""

    name: str
    ranks: str
    wire_bits: int | None  # None: no wire (centralized, local-only)
    eval_loss: float
    exact_match: float
    total_bytes: int | None
    seconds: float
    spread: str = ""  # min-max over nodes, for local-only


@dataclass(frozen=True)
class FederatedSetting:
    strategy: str
    ranks: str  # strategy.rank-plan; "" = every node at lora.rank
    wire_bits: int

    @property
    def name(self) -> str:
        return f"{self.strategy}-{'fp32' if self.wire_bits == 32 else f'int{self.wire_bits}'}"

    def overrides(self) -> dict[str, Any]:
        return {
            "strategy.name": self.strategy,
            "strategy.rank-plan": self.ranks,
            "wire.uplink-bits": self.wire_bits,
            "wire.downlink-bits": self.wire_bits,
            "wire.error-feedback": True,
        }


FEDERATED = tuple(
    FederatedSetting(strategy, "" if strategy == "fedavg" else MIXED_RANKS, bits)
    for strategy in ("fedavg", "zeropad", "flora", "flexlora", "ffa")
    for bits in (32, 4)
)
BASELINES = ("centralized", "local-only")


class Trainer:
    """The embedded 4-bit base with one rank-8 adapter that can be reset, trained and evaluated; no Flower."""

    def __init__(self) -> None:
        from pollen.config import parse_run_config
        from pollen.model import LoraHost, load_base_model, load_tokenizer
        from tasks.batches import tokenize_all
        from tasks.data import held_out
        from tasks.embedded import resolve_model_name

        self.cfg = parse_run_config(shipped_run_config())
        path = resolve_model_name(self.cfg.model.name)
        self.host = LoraHost(load_base_model(path, self.cfg.model), self.cfg.lora, seed=self.cfg.seed)
        self.host.activate(BASELINE_RANK)
        self.initial = self.host.read()
        self.tokenizer = load_tokenizer(path)
        self.eval_set = held_out(self.cfg.task, self.cfg.seed)
        self.eval_examples = tokenize_all(self.tokenizer, self.eval_set, self.cfg.train.max_seq_len)

    def train_and_evaluate(self, train_set: Any, steps: int, seed: int) -> tuple[float, float]:
        """Reset the adapter, train ``steps`` steps on ``train_set``, return (eval loss, exact match)."""
        import torch

        from pollen.training import train_steps
        from tasks.batches import sample_batches, tokenize_all
        from tasks.evaluation import exact_match, response_loss

        self.host.write(self.initial)
        examples = tokenize_all(self.tokenizer, train_set, self.cfg.train.max_seq_len)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # LoRA dropout, as in the ClientApp
        batches = sample_batches(examples, self.cfg.train.batch_size, self.tokenizer.pad_token_id, generator)
        train_steps(
            self.host.model,
            self.host.trainable_parameters(),
            batches,
            steps,
            self.cfg.train.lr,
            torch.device("cpu"),
        )
        model, pad = self.host.model, self.tokenizer.pad_token_id
        loss = response_loss(model, self.eval_examples, pad, EVAL_BATCH_SIZE)
        match = exact_match(
            model, self.tokenizer, self.eval_set, self.cfg.task.max_new_tokens, EVAL_BATCH_SIZE
        )
        return loss, match

    def partitions(self) -> list[Any]:
        """Every node's training split, exactly as the ClientApp gets it."""
        from tasks.data import node_data

        return [node_data(self.cfg.task, p, NUM_NODES, self.cfg.seed)[0] for p in range(NUM_NODES)]


def run_centralized(trainer: Trainer, steps: int) -> Row:
    from datasets import concatenate_datasets

    started = time.monotonic()
    loss, match = trainer.train_and_evaluate(
        concatenate_datasets(trainer.partitions()), steps, trainer.cfg.seed
    )
    return Row("centralized", str(BASELINE_RANK), None, loss, match, None, time.monotonic() - started)


def run_local_only(trainer: Trainer, steps: int) -> Row:
    started = time.monotonic()
    results = []
    for partition, train_set in enumerate(trainer.partitions()):
        results.append(trainer.train_and_evaluate(train_set, steps, trainer.cfg.seed + partition))
        print(
            f"  local-only node {partition}: eval_loss {results[-1][0]:.4f}, EM {results[-1][1]:.3f}",
            flush=True,
        )
    losses, matches = [r[0] for r in results], [r[1] for r in results]
    spread = f"EM {min(matches):.3f}-{max(matches):.3f}, loss {min(losses):.3f}-{max(losses):.3f}"
    return Row(
        "local-only (mean of nodes)",
        str(BASELINE_RANK),
        None,
        statistics.mean(losses),
        statistics.mean(matches),
        None,
        time.monotonic() - started,
        spread,
    )


def run_federated(setting: FederatedSetting, rounds: int) -> Row:
    rows, seconds = run_federation(setting.name, setting.overrides(), rounds, NUM_NODES)
    total = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    last = rows[-1]
    ranks = setting.ranks or str(BASELINE_RANK)
    return Row(setting.name, ranks, setting.wire_bits, last["eval_loss"], last["exact_match"], total, seconds)


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's two learning-quality checks, judged on the rows that ran."""
    by_name = {r.name: r for r in rows}
    reference, local = by_name.get("fedavg-fp32"), by_name.get("local-only (mean of nodes)")
    federated = [r for r in rows if r.wire_bits is not None]
    lines = []
    hetero_4bit = [r for r in federated if r.wire_bits == 4 and not r.name.startswith("fedavg")]
    if reference and hetero_4bit:
        best = max(hetero_4bit, key=lambda r: r.exact_match)
        gap = reference.exact_match - best.exact_match
        met = gap <= MAX_EM_GAP + 1e-9
        lines.append(
            f"- Best mixed-rank strategy on the 4-bit wire: {best.name}, exact match {best.exact_match:.3f} "
            f"against {reference.exact_match:.3f} for equal-rank fedavg at fp32 "
            f"({abs(100 * gap):.1f} points {'behind' if gap > 0 else 'ahead'}; may be at most "
            f"{100 * MAX_EM_GAP:.0f} behind): {'met' if met else 'NOT met'}."
        )
    if local and federated:
        losers = [
            r.name for r in federated if r.exact_match <= local.exact_match or r.eval_loss >= local.eval_loss
        ]
        lines.append(
            f"- Every federated row beats local-only on both exact match ({local.exact_match:.3f}) and "
            f"eval loss ({local.eval_loss:.4f}): "
            + ("met." if not losers else f"NOT met by {', '.join(losers)}.")
        )
    return lines


def render(
    command: str,
    load: float | None,
    rows: list[Row],
    rounds: int,
    steps: dict[str, int],
    notes: tuple[str, ...] = (),
) -> str:
    """The section: command, machine, what the rows mean, the table, spreads, ``notes`` and the checks."""
    lines = [
        "## Strategies: learning quality with mixed ranks",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shipped task and seed: {NUM_NODES} nodes, Dirichlet over skills, {rounds} rounds; exact match and "
        "eval loss of the final adapter on the server's held-out examples. Mixed ranks are "
        f"`strategy.rank-plan={MIXED_RANKS}` cycled over the nodes by partition id. The 4-bit wire is "
        "absmax 4-bit both directions with error feedback; bytes are measured serialized sizes over all "
        f"rounds, both directions. Centralized trains {steps['centralized']} steps on the union of the "
        f"partitions (the federation's total); local-only trains {steps['local-only']} steps per node on "
        "its own partition.",
        "",
        "| row | ranks | wire | final eval loss | exact match | total MB | wall s |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        wire = "-" if r.wire_bits is None else ("fp32" if r.wire_bits == 32 else f"{r.wire_bits}-bit")
        mb = "-" if r.total_bytes is None else f"{r.total_bytes / 1e6:.2f}"
        numbers = f"{r.eval_loss:.4f} | {r.exact_match:.3f} | {mb} | {r.seconds:.0f}"
        lines.append(f"| {r.name} | {r.ranks} | {wire} | {numbers} |")
    spreads = [f"{r.name}: {r.spread}" for r in rows if r.spread]
    if spreads:
        lines += ["", "Spread over nodes: " + "; ".join(spreads) + "."]
    if notes:
        lines += ["", *notes]
    checks = verdicts(rows)
    if checks:
        lines += ["", "Checks:", *checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds per strategy row")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (default: all)")
    args = parser.parse_args()
    known = [*BASELINES, *(s.name for s in FEDERATED)]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"--only {unknown}: known rows are {', '.join(known)}")
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds}: at least one round is needed")
    chosen = set(args.only or known)
    cfg = shipped_run_config()
    steps = {
        "centralized": args.rounds * nodes_per_round(cfg, NUM_NODES) * int(cfg["train.local-steps"]),
        "local-only": args.rounds * int(cfg["train.local-steps"]),
    }
    load = load_average()
    command = "python benchmarks/strategies.py" + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
    if args.only:
        command += " --only " + " ".join(args.only)
    ffa_note = (
        f"`ffa` nodes train B at `train.lr` {cfg['train.lr']} x `strategy.ffa-lr-multiplier` "
        f"{cfg['strategy.ffa-lr-multiplier']} (docs/STRATEGIES.md); every other row trains at `train.lr`."
    )
    rows: list[Row] = []
    total = len(chosen)

    def record(row: Row) -> None:
        """Print the row and rewrite the section, so an interrupted run still leaves what it measured."""
        rows.append(row)
        print(f"  {row}", flush=True)
        progress = () if len(rows) == total else (f"Partial: {len(rows)} of {total} rows have run.",)
        write_section("strategies", render(command, load, rows, args.rounds, steps, (ffa_note, *progress)))

    if chosen & set(BASELINES):
        trainer = Trainer()
        if "centralized" in chosen:
            print(f"running centralized ({steps['centralized']} steps)", flush=True)
            record(run_centralized(trainer, steps["centralized"]))
        if "local-only" in chosen:
            print(f"running local-only ({NUM_NODES} nodes x {steps['local-only']} steps)", flush=True)
            record(run_local_only(trainer, steps["local-only"]))
    for setting in FEDERATED:
        if setting.name in chosen:
            print(f"running {setting.name} ({args.rounds} rounds)", flush=True)
            record(run_federated(setting, args.rounds))
    print(render(command, load, rows, args.rounds, steps, (ffa_note,)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
