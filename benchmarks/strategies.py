"""Learning quality of every strategy on the non-IID default with mixed ranks, at a 32-bit and a 4-bit wire.

Usage: python benchmarks/strategies.py [--rounds 10] [--seeds 0 1 2] [--only ROW ...] [--rerun]

Rows, all on the shipped task (10 nodes, Dirichlet over skills) and judged on the server's held-out
examples:
- centralized: one rank-8 adapter trained on the union of all node partitions for as many steps as the
  whole federation trains (rounds x nodes sampled per round x local steps): the upper bound;
- local-only: each node trains a rank-8 adapter on its own partition alone for rounds x local steps
  (as if it were sampled every round, which favours this baseline); the mean over nodes;
- fedavg at equal rank 8 (the reference), and zeropad, flora, flexlora and ffa with ranks 2,4,8,16
  cycled over the nodes; each at a 32-bit wire and a 4-bit wire (both directions, error feedback).
Every finished (row, seed) run is appended to benchmarks/results/strategies.jsonl; runs already logged
for the same shipped config and rounds are reused unless --rerun, so seeds can be added one invocation
at a time. The table shows means over each row's logged seeds, and the checks compare rows on the seeds
both ran. Writes the "strategies" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import runlog  # noqa: E402
from benchmarks.report import (  # noqa: E402
    load_average,
    load_change,
    machine_line,
    nodes_per_round,
    run_federation,
    write_section,
)
from scripts.flower_run import shipped_run_config  # noqa: E402
from strategies.registry import STRATEGY_CLASSES  # noqa: E402

NUM_NODES = 10
MIXED_RANKS = "2,4,8,16"
BASELINE_RANK = 8
MAX_EM_GAP = 0.03  # a heterogeneous 4-bit strategy must be within 3 exact-match points of fp32 fedavg
LOG = ROOT / "benchmarks" / "results" / "strategies.jsonl"
LOCAL_ONLY = "local-only (mean of nodes)"


@dataclass(frozen=True)
class Run:
    """One row on one seed: how it did and what it sent (the figures a log record keeps)."""

    eval_loss: float
    exact_match: float
    total_bytes: int | None  # None: no wire (centralized, local-only)
    seconds: float
    node_eval_loss: tuple[float, ...] = ()  # local-only: every node's own figures
    node_exact_match: tuple[float, ...] = ()


@dataclass(frozen=True)
class Row:
    """One line of the table: a row's runs by seed."""

    name: str
    ranks: str
    wire_bits: int | None  # None: no wire (centralized, local-only)
    runs: Mapping[int, Run] = field(default_factory=dict)  # seed -> run

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)

    def mean(self, attribute: str, seeds: Sequence[int] | None = None) -> float:
        """Mean of one Run field over ``seeds`` (default: every seed the row ran)."""
        chosen = self.seeds if seeds is None else seeds
        return statistics.fmean(float(getattr(self.runs[s], attribute)) for s in chosen)

    def sd(self, attribute: str) -> float | None:
        """Standard deviation over seeds; None with a single seed."""
        values = [float(getattr(self.runs[s], attribute)) for s in self.seeds]
        return statistics.stdev(values) if len(values) > 1 else None


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
            **runlog.EVERY_ROUND,
            "strategy.name": self.strategy,
            "strategy.rank-plan": self.ranks,
            "wire.uplink-bits": self.wire_bits,
            "wire.downlink-bits": self.wire_bits,
            "wire.error-feedback": True,
        }


FEDERATED = tuple(
    FederatedSetting(strategy, MIXED_RANKS if STRATEGY_CLASSES[strategy].mixed_ranks else "", bits)
    for strategy in ("fedavg", "zeropad", "flora", "flexlora", "ffa")
    for bits in (32, 4)
)
BASELINES = ("centralized", "local-only")
ROW_NAMES = {"centralized": "centralized", "local-only": LOCAL_ONLY}  # --only name -> table name


def row_shape(name: str) -> tuple[str, int | None]:
    """(ranks, wire bits) of a table row, by its name."""
    for setting in FEDERATED:
        if setting.name == name:
            return setting.ranks or str(BASELINE_RANK), setting.wire_bits
    return str(BASELINE_RANK), None


class Trainer:
    """A node's worker (embedded 4-bit base) with one rank-8 adapter that is reset and trained as a node
    trains it, then scored by the server's own central evaluator; no Flower."""

    def __init__(self, seed: int) -> None:
        from client_app.worker import load_worker
        from pollen.config import parse_run_config
        from pollen.protocol import knobs_for
        from server_app.app import build_evaluator
        from server_app.preflight import preflight

        run_config = {**shipped_run_config(), "seed": seed}
        self.cfg = parse_run_config(run_config)
        self.worker = load_worker(self.cfg)
        self.worker.host.activate(BASELINE_RANK)
        self.initial = self.worker.host.read()
        self.knobs = knobs_for(self.cfg, BASELINE_RANK)
        self.evaluate = build_evaluator(preflight(run_config), self.worker.host)

    def train_and_evaluate(self, train_set: Any, steps: int, seed: int) -> tuple[float, float]:
        """Reset the adapter, train ``steps`` steps on ``train_set`` as a node does; (eval loss, EM)."""
        from dataclasses import replace

        from client_app.worker import train_from

        knobs = replace(self.knobs, local_steps=steps)
        train_from(self.worker, self.initial, knobs, train_set, seed, self.cfg.task.prompt_format)
        figures = self.evaluate(self.worker.host.read())
        loss, match = figures["eval_loss"], figures.get("exact_match")
        if loss is None or match is None:
            raise ValueError("the held-out set has no example with a response token")
        return loss, match

    def partitions(self) -> list[Any]:
        """Every node's training split, exactly as the ClientApp gets it."""
        from tasks.data import node_data

        return [node_data(self.cfg.task, p, NUM_NODES, self.cfg.seed)[0] for p in range(NUM_NODES)]


def run_centralized(trainer: Trainer, steps: int) -> Run:
    from datasets import concatenate_datasets

    started = time.monotonic()
    loss, match = trainer.train_and_evaluate(
        concatenate_datasets(trainer.partitions()), steps, trainer.cfg.seed
    )
    return Run(loss, match, None, time.monotonic() - started)


def run_local_only(trainer: Trainer, steps: int) -> Run:
    started = time.monotonic()
    results = []
    for partition, train_set in enumerate(trainer.partitions()):
        results.append(trainer.train_and_evaluate(train_set, steps, trainer.cfg.seed + partition))
        print(
            f"  local-only node {partition}: eval_loss {results[-1][0]:.4f}, EM {results[-1][1]:.3f}",
            flush=True,
        )
    losses, matches = tuple(r[0] for r in results), tuple(r[1] for r in results)
    return Run(
        statistics.fmean(losses), statistics.fmean(matches), None, time.monotonic() - started, losses, matches
    )


def run_federated(setting: FederatedSetting, rounds: int, seed: int) -> Run:
    overrides = {**setting.overrides(), "seed": seed}
    rows, seconds = run_federation(f"{setting.name}-s{seed}", overrides, rounds, NUM_NODES)
    total = sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rows)
    return Run(float(rows[-1]["eval_loss"]), float(rows[-1]["exact_match"]), total, seconds)


def to_record(name: str, seed: int, rounds: int, config: str, run: Run, load: str) -> dict[str, Any]:
    """The log line of one run, with when, where and at which commit it was made."""
    return {
        "row": name,
        "seed": seed,
        "rounds": rounds,
        "nodes": NUM_NODES,
        "config": config,
        "eval_loss": run.eval_loss,
        "exact_match": run.exact_match,
        "total_bytes": run.total_bytes,
        "seconds": round(run.seconds, 1),
        "node_eval_loss": list(run.node_eval_loss),
        "node_exact_match": list(run.node_exact_match),
        "date": runlog.today(),
        "commit": runlog.git_commit(),
        "machine": machine_line(None),
        "load": load,
    }


def same_experiment(records: Sequence[Mapping[str, Any]], rounds: int, config: str) -> list[dict[str, Any]]:
    """The logged runs made with this shipped config (fingerprint), round count and number of nodes."""
    return [
        dict(r)
        for r in records
        if r.get("rounds") == rounds and r.get("config") == config and r.get("nodes") == NUM_NODES
    ]


def logged_rows(records: Sequence[Mapping[str, Any]]) -> list[Row]:
    """Table rows from one experiment's logged runs (see same_experiment): the newest per (row, seed)."""
    newest = runlog.latest(records, ("row", "seed"))
    by_row: dict[str, dict[int, Run]] = {}
    for (name, seed), record in newest.items():
        by_row.setdefault(str(name), {})[int(seed)] = Run(
            float(record["eval_loss"]),
            float(record["exact_match"]),
            record.get("total_bytes"),
            float(record["seconds"]),
            tuple(record.get("node_eval_loss") or ()),
            tuple(record.get("node_exact_match") or ()),
        )
    order = [*ROW_NAMES.values(), *(s.name for s in FEDERATED)]
    return [Row(name, *row_shape(name), by_row[name]) for name in order if name in by_row]


def shared_seeds(a: Row, b: Row) -> list[int]:
    return sorted(set(a.runs) & set(b.runs))


def _seed_list(seeds: Sequence[int]) -> str:
    return ",".join(map(str, seeds))


def verdicts(rows: list[Row]) -> list[str]:
    """The issue's two learning-quality checks, on means over the seeds both compared rows ran."""
    by_name = {r.name: r for r in rows}
    reference, local = by_name.get("fedavg-fp32"), by_name.get(LOCAL_ONLY)
    federated = [r for r in rows if r.wire_bits is not None]
    lines = []
    hetero_4bit = [r for r in federated if r.wire_bits == 4 and not r.name.startswith("fedavg")]
    if reference:
        gaps = []
        for row in hetero_4bit:
            seeds = shared_seeds(reference, row)
            if seeds:
                gap = reference.mean("exact_match", seeds) - row.mean("exact_match", seeds)
                gaps.append((gap, row, seeds))
        if gaps:
            gap, best, seeds = min(gaps, key=lambda g: g[0])
            met = gap <= MAX_EM_GAP + 1e-9
            lines.append(
                f"- Best mixed-rank strategy on the 4-bit wire: {best.name}, exact match "
                f"{best.mean('exact_match', seeds):.3f} against "
                f"{reference.mean('exact_match', seeds):.3f} for equal-rank fedavg at fp32, "
                f"means over seeds {_seed_list(seeds)} "
                f"({abs(100 * gap):.1f} points {'behind' if gap > 0 else 'ahead'}; may be at most "
                f"{100 * MAX_EM_GAP:.0f} behind): {'met' if met else 'NOT met'}."
            )
    if local and federated:
        losers, compared = [], set()
        for row in federated:
            seeds = shared_seeds(local, row)
            if not seeds:
                continue
            compared.add(_seed_list(seeds))
            em, loss = row.mean("exact_match", seeds), row.mean("eval_loss", seeds)
            local_em, local_loss = local.mean("exact_match", seeds), local.mean("eval_loss", seeds)
            if em <= local_em or loss >= local_loss:
                losers.append(
                    f"{row.name} (exact match {em:.3f} against {local_em:.3f}, eval loss {loss:.4f} against "
                    f"{local_loss:.4f}, seeds {_seed_list(seeds)})"
                )
        if compared:
            lines.append(
                "- Every federated row beats local-only on both mean exact match and mean eval loss, on the "
                f"seeds both ran ({'; '.join(sorted(compared))}): "
                + ("met." if not losers else f"NOT met by {', '.join(losers)}.")
            )
    return lines


def _with_sd(mean: float, sd: float | None, digits: int) -> str:
    return f"{mean:.{digits}f}" + ("" if sd is None else f" ({sd:.{digits}f})")


def provenance(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the table's runs were made: dates, commits and machines, and any note a record carries."""
    dates = sorted({str(r.get("date")) for r in records})
    commits = sorted({str(r.get("commit")) for r in records})
    machines = sorted({str(r.get("machine")) for r in records})
    notes = sorted({str(r["note"]) for r in records if r.get("note")})
    lines = [
        f"Runs: {len(records)} from `benchmarks/results/strategies.jsonl`, made "
        f"{dates[0] if len(dates) == 1 else f'{dates[0]} to {dates[-1]}'} at commit"
        f"{'' if len(commits) == 1 else 's'} {', '.join(commits)}, on: {'; '.join(machines)}."
    ]
    return lines + notes


def render(
    command: str,
    load: float | None,
    rows: list[Row],
    rounds: int,
    steps: dict[str, int],
    notes: tuple[str, ...] = (),
) -> str:
    """The section: command, machine, what the rows mean, the tables, notes and the checks."""
    lines = [
        "## Strategies: learning quality with mixed ranks",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine_line(load)}.",
        "",
        f"Shipped task: {NUM_NODES} nodes, Dirichlet over skills, {rounds} rounds; exact match and "
        "eval loss of the final adapter on the server's held-out examples. Each row runs once per seed in "
        "its `seeds` column (run config `seed`: data split, sampling, initialisation, training order and "
        "the held-out examples); figures are means over those seeds with the standard deviation in "
        f"brackets. Mixed ranks are `strategy.rank-plan={MIXED_RANKS}` cycled over the nodes by partition "
        "id. The 4-bit wire is absmax 4-bit both directions with error feedback; bytes are measured "
        f"serialized sizes over all rounds, both directions. Centralized trains {steps['centralized']} "
        f"steps on the union of the partitions (the federation's total); local-only trains "
        f"{steps['local-only']} steps per node on its own partition.",
        "",
        "| row | ranks | wire | seeds | final eval loss | exact match | total MB | wall s |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        wire = "-" if r.wire_bits is None else ("fp32" if r.wire_bits == 32 else f"{r.wire_bits}-bit")
        sent = [run.total_bytes for run in r.runs.values() if run.total_bytes is not None]
        mb = "-" if not sent else f"{statistics.fmean(sent) / 1e6:.2f}"
        loss = _with_sd(r.mean("eval_loss"), r.sd("eval_loss"), 4)
        match = _with_sd(r.mean("exact_match"), r.sd("exact_match"), 3)
        lines.append(
            f"| {r.name} | {r.ranks} | {wire} | {_seed_list(r.seeds)} | {loss} | {match} | {mb} "
            f"| {r.mean('seconds'):.0f} |"
        )
    seeds = sorted({s for r in rows for s in r.runs})
    if len(seeds) > 1:
        lines += [
            "",
            "Per seed, exact match / final eval loss:",
            "",
            "| row | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|" + "---:|" * len(seeds),
        ]
        for r in rows:
            cells = [
                f"{r.runs[s].exact_match:.3f} / {r.runs[s].eval_loss:.4f}" if s in r.runs else "-"
                for s in seeds
            ]
            lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    for r in rows:
        node_em = [m for run in r.runs.values() for m in run.node_exact_match]
        node_loss = [x for run in r.runs.values() for x in run.node_eval_loss]
        if node_em and node_loss:
            lines += [
                "",
                f"Spread over nodes and seeds, {r.name}: exact match {min(node_em):.3f}-{max(node_em):.3f}, "
                f"eval loss {min(node_loss):.3f}-{max(node_loss):.3f}.",
            ]
    for note in notes:
        lines += ["", note]
    checks = verdicts(rows)
    if checks:
        lines += ["", "Checks:", *checks]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds per strategy row")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="run-config seeds (default 0 1 2)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="rows to run (default: all)")
    parser.add_argument("--rerun", action="store_true", help="measure runs the log already holds again")
    args = parser.parse_args()
    known = [*BASELINES, *(s.name for s in FEDERATED)]
    unknown = [n for n in args.only or [] if n not in known]
    if unknown:
        parser.error(f"--only {unknown}: known rows are {', '.join(known)}")
    if args.rounds < 1 or any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--rounds={args.rounds} --seeds={args.seeds}: need >= 1 round and distinct seeds >= 0")
    chosen = [n for n in known if n in set(args.only or known)]
    cfg = {**shipped_run_config(), **runlog.EVERY_ROUND}
    config = runlog.config_fingerprint(cfg)
    steps = {
        "centralized": args.rounds * nodes_per_round(cfg, NUM_NODES) * int(cfg["train.local-steps"]),
        "local-only": args.rounds * int(cfg["train.local-steps"]),
    }
    load = load_average()
    command = "python benchmarks/strategies.py" + ("" if args.rounds == 10 else f" --rounds {args.rounds}")
    if args.seeds != [0, 1, 2]:
        command += " --seeds " + " ".join(map(str, args.seeds))
    if args.only:
        command += " --only " + " ".join(args.only)
    ffa_note = (
        f"`ffa` nodes train B at `train.lr` {cfg['train.lr']} x `strategy.ffa-lr-multiplier` "
        f"{cfg['strategy.ffa-lr-multiplier']} (docs/STRATEGIES.md); every other row trains at `train.lr`."
    )
    reuse_note = (
        "Runs already in the log for this shipped config and round count are reused; add `--rerun` to "
        "measure them again."
    )
    todo = [(seed, name) for seed in args.seeds for name in chosen]
    done = set(runlog.latest(same_experiment(runlog.read(LOG), args.rounds, config), ("row", "seed")))

    def publish(progress: tuple[str, ...] = ()) -> str:
        """Rewrite the section from the whole log, so an interrupted run still leaves what it measured."""
        records = same_experiment(runlog.read(LOG), args.rounds, config)
        rows = logged_rows(records)
        notes = (reuse_note, *provenance(records), ffa_note, *progress) if records else progress
        text = render(command, load, rows, args.rounds, steps, notes)
        if rows:
            write_section("strategies", text)
        return text

    trainer: Trainer | None = None
    for index, (seed, name) in enumerate(todo, start=1):
        table_name = ROW_NAMES.get(name, name)
        if (table_name, seed) in done and not args.rerun:
            print(f"{name}, seed {seed}: already in {LOG.relative_to(ROOT)}, reused", flush=True)
            continue
        print(f"running {name}, seed {seed} ({index} of {len(todo)})", flush=True)
        if name in BASELINES:
            if trainer is None or trainer.cfg.seed != seed:
                trainer = Trainer(seed)
            run = (
                run_centralized(trainer, steps[name])
                if name == "centralized"
                else run_local_only(trainer, steps[name])
            )
        else:
            run = run_federated(next(s for s in FEDERATED if s.name == name), args.rounds, seed)
        print(f"  {table_name}, seed {seed}: {run}", flush=True)
        runlog.append(LOG, to_record(table_name, seed, args.rounds, config, run, load_change(load)))
        publish(
            (f"Partial: {index} of {len(todo)} runs of this command are done.",) if index < len(todo) else ()
        )
    print(publish())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
