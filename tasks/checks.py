"""The server's data check, run before anything is written or trained.

It reads the data as the run will (same split, same prompt format, same tokenizer and length), and
turns every way a user's own file can fail into one line naming the key, the value and what would work:
a partition column the data lacks, examples whose response would not fit ``train.max-seq-len``, a metric
that cannot score the outputs, partitions too small for a node. What it decides (the metric, the label
set, the majority baseline) is returned, so that evaluation uses exactly what was checked.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pollen.config import TaskConfig
from tasks.batches import ExampleTokenizer, TokenizedExample
from tasks.data import (
    MIN_PARTITION_SIZE,
    DataError,
    check_partition_column,
    held_out,
    load_pool,
    partition_sizes,
)
from tasks.metrics import MetricError, check_metric, choose_metric, label_set, majority_baseline
from tasks.prompts import PromptFormat, format_response

# Training examples whose response would be cut away entirely may be at most this share of the pool.
MAX_LOST_SHARE = 0.05
# The length check tokenizes at most this many training examples (a seeded sample of a larger pool).
MAX_CHECKED_POOL = 20_000


@dataclass
class LengthReport:
    """How ``train.max-seq-len`` cuts a set of examples."""

    checked: int = 0
    prompt_cut: int = 0  # examples that lose prompt tokens
    response_cut: int = 0  # examples that lose part of their response
    lost: int = 0  # examples that lose their whole response
    longest: int = 0  # tokens of the longest example uncut

    @classmethod
    def of(cls, examples: Sequence[TokenizedExample]) -> LengthReport:
        report = cls(checked=len(examples))
        for e in examples:
            report.prompt_cut += e.prompt_cut > 0
            report.response_cut += e.response_cut > 0 and e.has_response
            report.lost += not e.has_response
            report.longest = max(report.longest, len(e.input_ids) + e.prompt_cut + e.response_cut)
        return report


@dataclass
class DataCheck:
    """What the check found: problems stop the run; notes are logged; the rest configures evaluation."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    metric: str = "loss"  # the resolved task.metric: exact, label, choice or loss
    labels: tuple[str, ...] = ()
    majority: float | None = None  # label tasks: the score of always answering the commonest label
    pool: LengthReport = field(default_factory=LengthReport)
    held_out: LengthReport = field(default_factory=LengthReport)
    # The held-out set as checked, (tokenized example, reference output): what the evaluator scores.
    evaluation: list[tuple[TokenizedExample, str]] = field(default_factory=list)


def _sample(pool: Any, seed: int) -> Any:
    if len(pool) <= MAX_CHECKED_POOL:
        return pool
    return pool.select(sorted(random.Random(seed).sample(range(len(pool)), MAX_CHECKED_POOL)))


def check_lengths(
    pool: Any, evaluation: Any, tokenize: ExampleTokenizer, seed: int, check: DataCheck
) -> None:
    """Count what train.max-seq-len cuts; an error when held-out or too many training answers vanish."""
    max_len = tokenize.max_seq_len
    check.evaluation = [(tokenize(e), format_response(e)) for e in evaluation]
    check.held_out = LengthReport.of([example for example, _ in check.evaluation])
    check.pool = LengthReport.of([tokenize(e) for e in _sample(pool, seed)])
    longest = max(check.held_out.longest, check.pool.longest)
    fits = f"train.max-seq-len={longest} fits every example"
    if check.held_out.lost:
        check.problems.append(
            f"train.max-seq-len={max_len} leaves {check.held_out.lost} of {check.held_out.checked} held-out "
            f"examples no response token (the prompt's fixed text alone is too long); {fits}"
        )
    if check.pool.lost > MAX_LOST_SHARE * check.pool.checked:
        check.problems.append(
            f"train.max-seq-len={max_len} leaves {check.pool.lost} of {check.pool.checked} training examples "
            f"no response token (more than {MAX_LOST_SHARE:.0%}); {fits}"
        )
    cut = [(name, r) for name, r in (("training", check.pool), ("held-out", check.held_out)) if r.prompt_cut]
    if cut:
        counts = " and ".join(f"{r.prompt_cut} of {r.checked} {name}" for name, r in cut)
        check.notes.append(
            f"train.max-seq-len={max_len}: {counts} examples are longer and lose the start of their input "
            f"(then of their instruction), never their response; {fits}"
        )
    shortened = check.pool.response_cut + check.held_out.response_cut
    if shortened:
        check.notes.append(
            f"train.max-seq-len={max_len}: {shortened} examples have responses too long to fit whole; "
            f"their responses lose their ends; {fits}"
        )
    if check.pool.lost:
        check.notes.append(f"{check.pool.lost} training examples carry no response token and are skipped")


def check_metric_choice(task: TaskConfig, pool: Any, evaluation: Any, check: DataCheck) -> None:
    """Resolve task.metric (and the label set) for these outputs; a problem when it cannot score them."""
    references = [format_response(e) for e in evaluation]
    metric = task.metric
    if metric == "auto":
        metric = "label" if task.labels else choose_metric(references)
    try:
        check_metric(metric, references)
    except MetricError as exc:
        check.problems.append(str(exc))
        return
    check.metric = metric
    if metric != "label":
        return
    found = label_set([format_response(e) for e in _sample(pool, 0)] + references)
    if task.labels:
        known = set(label_set(list(task.labels)))
        foreign = [r for r in label_set(references) if r not in known]
        if foreign:
            check.problems.append(
                f"task.labels={','.join(task.labels)!r} lacks held-out outputs {foreign[:5]}; "
                "add them or leave task.labels empty to use the data's outputs"
            )
            return
    check.labels = tuple(task.labels) or tuple(found)
    check.majority = majority_baseline(references)


def check_task_data(
    task: TaskConfig, seed: int, tokenizer: Any, max_seq_len: int, prompt: PromptFormat
) -> DataCheck:
    """Every data check that needs no node: sources, columns, lengths and the metric."""
    check = DataCheck()
    try:
        pool, evaluation = load_pool(task, seed), held_out(task, seed)
        check_partition_column(task, list(pool.column_names))
    except DataError as exc:
        check.problems.append(str(exc))
        return check
    if len(pool) == 0:
        check.problems.append("the training pool is empty: task.data-path (or task.name) holds no examples")
        return check
    check_lengths(pool, evaluation, ExampleTokenizer(tokenizer, max_seq_len, prompt), seed, check)
    check_metric_choice(task, pool, evaluation, check)
    return check


def check_partitions(task: TaskConfig, num_partitions: int, seed: int) -> tuple[str, list[int]]:
    """A line on how the pool splits over ``num_partitions`` nodes, and each partition's size;
    DataError when one gets too few."""
    sizes = partition_sizes(task, num_partitions, seed)
    smallest = min(range(num_partitions), key=lambda pid: sizes[pid])
    if sizes[smallest] < MIN_PARTITION_SIZE:
        raise DataError(
            f"partition {smallest} of {num_partitions} gets {sizes[smallest]} examples, fewer than the "
            f"{MIN_PARTITION_SIZE} a node needs; raise task.alpha, set task.partitioner='iid', "
            "or use more data"
        )
    how = "iid" if task.partitioner == "iid" else f"dirichlet over {task.partition_by!r}, alpha {task.alpha}"
    line = (
        f"data: {sum(sizes)} training examples over {num_partitions} partitions ({how}); smallest "
        f"{sizes[smallest]} (partition {smallest}), largest {max(sizes)}"
    )
    return line, sizes
