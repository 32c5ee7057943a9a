"""Instruction data: the embedded synthetic skills, local Alpaca-style files, or Hugging Face datasets.

Every source is normalised to the columns ``instruction``, ``input``, ``output`` (plus whatever else it
had, e.g. ``skill``), split into a server-side held-out set and a training pool, and the pool is
partitioned over nodes with ``flwr-datasets`` partitioners. Server and nodes make the same split from
the same seed, so no example the server evaluates on is ever trained on.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from pollen.config import TaskConfig

# FlowerTune's four domains, by short name.
HUB_DATASETS: dict[str, str] = {
    "alpaca": "vicgalle/alpaca-gpt4",
    "finance": "FinGPT/fingpt-sentiment-train",
    "medical": "medalpaca/medical_meadow_medical_flashcards",
    "code": "flwrlabs/code-alpaca-20k",
}
LOCAL_FORMATS: dict[str, str] = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Other names datasets use for the three Alpaca columns.
_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "prompt", "question", "query"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion"),
}
# Share of a node's partition kept back for its own evaluation (federated evaluate).
LOCAL_EVAL_SHARE = 0.1


class DataError(ValueError):
    """The data source cannot be used; the message says which key or file and why."""


def local_format(path: str) -> str:
    """The `datasets` builder for a local file, by extension; DataError for other files."""
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(
            f"task.data-path={path!r} has extension {suffix or '(none)'!r}: expected one of "
            f"{', '.join(LOCAL_FORMATS)}"
        )
    return LOCAL_FORMATS[suffix]


def check_data_source(task: TaskConfig) -> None:
    """Cheap checks that the data can be found (before any training starts)."""
    if task.data_path:
        local_format(task.data_path)
        if not Path(task.data_path).expanduser().is_file():
            raise DataError(f"task.data-path={task.data_path!r} does not exist or is not a file")


def normalise_columns(dataset: Any, source: str) -> Any:
    """Rename alias columns to instruction/input/output; add an empty ``input`` when absent."""
    columns = set(dataset.column_names)
    renames: dict[str, str] = {}
    for target, aliases in _ALIASES.items():
        if target in columns:
            continue
        found = next((a for a in aliases if a in columns), None)
        if found is not None:
            renames[found] = target
    if renames:
        dataset = dataset.rename_columns(renames)
    columns = set(dataset.column_names)
    missing = [c for c in ("instruction", "output") if c not in columns]
    if missing:
        raise DataError(
            f"{source} has columns {sorted(columns)} but needs {missing} "
            "(Alpaca format: instruction, optional input, output)"
        )
    if "input" not in columns:
        dataset = dataset.add_column("input", [""] * len(dataset))

    from datasets import Value

    for column in ("instruction", "input", "output"):
        if dataset.features[column] != Value("string"):
            dataset = dataset.cast_column(column, Value("string"))

    def _fill_missing(example: dict[str, Any]) -> dict[str, str]:
        return {k: example[k] or "" for k in ("instruction", "input", "output")}

    return dataset.map(_fill_missing)


def _quiet_datasets() -> None:
    """Per-call progress bars of `datasets` would drown the per-round progress lines."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def load_file(path: str) -> Any:
    """A local Alpaca-style JSON/JSONL/CSV/Parquet file as a normalised `datasets.Dataset`."""
    from datasets import load_dataset

    _quiet_datasets()

    builder = local_format(path)
    resolved = str(Path(path).expanduser())
    if not Path(resolved).is_file():
        raise DataError(f"data file {path!r} does not exist or is not a file")
    try:
        dataset = load_dataset(builder, data_files=resolved, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        raise DataError(f"data file {path!r} could not be read as {builder}: {exc}") from exc
    if len(dataset) == 0:
        raise DataError(f"data file {path!r} holds no examples")
    return normalise_columns(dataset, f"data file {path!r}")


def load_hub(name: str) -> Any:
    """A Hugging Face dataset by short domain name or id (needs the hub or a local cache)."""
    from datasets import load_dataset

    _quiet_datasets()
    dataset_id = HUB_DATASETS.get(name, name)
    try:
        dataset = load_dataset(dataset_id, split="train")
    except Exception as exc:  # offline, unknown id, gated...
        raise DataError(
            f"task.name={name!r} ({dataset_id}) could not be loaded from the hub or its cache: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
            "set task.data-path to a local file"
        ) from exc
    return normalise_columns(dataset, f"dataset {dataset_id!r}")


@lru_cache(maxsize=4)
def load_pool_and_eval(task: TaskConfig, seed: int) -> tuple[Any, Any]:
    """(training pool, held-out eval set) for the run; cached per process by the task config and seed."""
    if task.data_path:
        dataset = load_file(task.data_path).shuffle(seed=seed)
    elif task.name == "synthetic":
        from tasks.synthetic import synthetic_splits

        pool, held_out = synthetic_splits(task.num_train, task.num_eval, seed)
        return pool, held_out
    else:
        dataset = load_hub(task.name).shuffle(seed=seed)
    if len(dataset) <= task.num_eval:
        raise DataError(
            f"the dataset has {len(dataset)} examples, not more than task.num-eval={task.num_eval}; "
            "lower task.num-eval or use more data"
        )
    held_out = dataset.select(range(task.num_eval))
    pool = dataset.select(range(task.num_eval, len(dataset)))
    return pool, held_out


def make_partitioner(task: TaskConfig, num_partitions: int, seed: int) -> Any:
    """The flwr-datasets partitioner the run config asks for."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if task.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=task.partition_by,
        alpha=task.alpha,
        min_partition_size=2,
        self_balancing=True,
        seed=seed,
    )


@lru_cache(maxsize=2)
def _partitioner_for(task: TaskConfig, num_partitions: int, seed: int) -> Any:
    pool, _ = load_pool_and_eval(task, seed)
    if task.partitioner == "dirichlet" and task.partition_by not in pool.column_names:
        raise DataError(
            f"task.partition-by={task.partition_by!r} is not a column of the data ({pool.column_names}); "
            "name one of them or set task.partitioner='iid'"
        )
    partitioner = make_partitioner(task, num_partitions, seed)
    partitioner.dataset = pool
    return partitioner


def node_data(
    task: TaskConfig, partition_id: int, num_partitions: int, seed: int, data_path: str = ""
) -> tuple[Any, Any]:
    """(train, local eval) examples of one node: its own file if it has one, else its partition."""
    if data_path:
        dataset = load_file(data_path).shuffle(seed=seed)
    else:
        dataset = _partitioner_for(task, num_partitions, seed).load_partition(partition_id)
    if len(dataset) < 2:
        raise DataError(f"partition {partition_id} holds {len(dataset)} examples; it needs at least 2")
    split = dataset.train_test_split(test_size=LOCAL_EVAL_SHARE, seed=seed) if len(dataset) >= 10 else None
    if split is None:
        return dataset, dataset.select(range(1))
    return split["train"], split["test"]


def held_out(task: TaskConfig, seed: int) -> Any:
    """The server's evaluation examples."""
    return load_pool_and_eval(task, seed)[1]
