"""Instruction data: the embedded synthetic skills, local Alpaca-style files, or Hugging Face datasets.

Every source is normalised to the columns ``instruction``, ``input``, ``output`` (plus whatever else it
had, e.g. ``skill``), split into a server-side held-out set and a training pool, and the pool is
partitioned over nodes with ``flwr-datasets`` partitioners. Server and nodes make the same split from
the same seed, so no example the server evaluates on is ever trained on.
"""

from __future__ import annotations

import json
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
MIN_PARTITION_SIZE = 2  # examples a node needs: one to train on, one to evaluate on


class DataError(ValueError):
    """The data source cannot be used; the message says which key or file and why."""


def local_format(path: str, key: str = "task.data-path") -> str:
    """The `datasets` builder for a local file, by extension; DataError for other files."""
    suffix = Path(path).suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(
            f"{key}={path!r} has extension {suffix or '(none)'!r}: expected one of {', '.join(LOCAL_FORMATS)}"
        )
    return LOCAL_FORMATS[suffix]


def check_data_source(task: TaskConfig) -> None:
    """Cheap checks that the data files can be found (before any training starts)."""
    for key, path in (("task.data-path", task.data_path), ("task.eval-path", task.eval_path)):
        if path:
            local_format(path, key)
            if not Path(path).expanduser().is_file():
                raise DataError(f"{key}={path!r} does not exist or is not a file")


def normalise_columns(dataset: Any, source: str) -> Any:
    """Rename alias columns to instruction/input/output; add an empty ``input`` when absent.

    Numbers and booleans (e.g. 0/1 labels) become text; nested values (lists, dicts) are refused, and
    so is a source in which no example has an output.
    """
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
        feature = dataset.features[column]
        if feature == Value("string"):
            continue
        if isinstance(feature, Value):
            dataset = dataset.cast_column(column, Value("string"))
            continue
        # lists, objects, or a JSON column mixing them with text and numbers
        values = dataset[column]
        row = next((i for i, v in enumerate(values) if not isinstance(v, _SCALARS)), None)
        if row is not None:
            raise DataError(
                f"{source}: column {column!r} holds a {type(values[row]).__name__} in row {row + 1} "
                f"({str(values[row])[:40]!r}); expected text (or a number) in every row: write it as a string"
            )
        dataset = dataset.remove_columns(column).add_column(column, [_as_text(v) for v in values])

    def _fill_missing(example: dict[str, Any]) -> dict[str, str]:
        return {k: example[k] or "" for k in ("instruction", "input", "output")}

    dataset = dataset.map(_fill_missing)
    if not any(text.strip() for text in dataset["output"]):
        raise DataError(f"{source}: every example's output is empty; there is nothing to learn")
    return dataset


_SCALARS = (str, int, float, bool, type(None))


def _as_text(value: Any) -> str:
    """A scalar of a mixed JSON column as text, the way Arrow casts a number or boolean column."""
    return value if isinstance(value, str) else "" if value is None else json.dumps(value)


def _quiet_datasets() -> None:
    """Per-call progress bars of `datasets` would drown the per-round progress lines."""
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()


def _blank(path: str) -> bool:
    """True when the file holds only whitespace (read until its first other character)."""
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if block.strip():
                return False
    return True


def _innermost(exc: BaseException) -> str:
    """The first line of the deepest cause: `datasets` wraps the reader's own message."""
    reason = ""
    seen: BaseException | None = exc
    while seen is not None:
        text = str(seen).strip()
        reason = text.splitlines()[0] if text else reason or type(seen).__name__
        seen = seen.__cause__ or seen.__context__
    return reason


def _json_lines_problem(text: str) -> str:
    """The first line of a JSON Lines text that does not parse or is not an object, or ''."""
    offset = 0
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if line.strip():
            try:
                item = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                where = json.JSONDecodeError(exc.msg, text, offset + exc.pos)
                return f"is not valid JSON: line {where.lineno} column {where.colno}: {exc.msg}"
            if not isinstance(item, dict):
                return f"holds a {type(item).__name__} on line {number}; expected one object per line"
        offset += len(line)
    return ""


def _json_problem(path: str) -> str:
    """Where a JSON or JSON Lines file that `datasets` refused goes wrong (line and column), or ''."""
    try:
        data = Path(path).read_bytes()
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return f"is not UTF-8 text (line {line}, byte {exc.start} of the file): save it as UTF-8"
    except OSError:
        return ""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip().startswith("["):  # one JSON document
            return f"is not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}"
        return _json_lines_problem(text)
    if isinstance(document, list):
        bad = next((i for i, item in enumerate(document) if not isinstance(item, dict)), None)
        if bad is None:
            return "holds no examples" if not document else ""
        return f"holds a {type(document[bad]).__name__} as item {bad + 1}; expected one object per example"
    if not isinstance(document, dict):
        return f"holds a JSON {type(document).__name__}; expected a list of objects or one object per line"
    return ""


def load_file(path: str, key: str = "task.data-path") -> Any:
    """A local Alpaca-style JSON/JSONL/CSV/Parquet file as a normalised `datasets.Dataset`."""
    from datasets import load_dataset

    _quiet_datasets()

    builder = local_format(path, key)
    resolved = str(Path(path).expanduser())
    if not Path(resolved).is_file():
        raise DataError(f"{key}={path!r} does not exist or is not a file")
    if Path(resolved).stat().st_size == 0 or (builder == "json" and _blank(resolved)):
        raise DataError(f"{key}={path!r} is an empty file; expected Alpaca-style examples")
    try:
        dataset = load_dataset(builder, data_files=resolved, split="train")
    except Exception as exc:  # datasets raises many types for unreadable files
        where = _json_problem(resolved) if builder == "json" else ""
        if where:
            raise DataError(f"{key}={path!r} {where}") from exc
        raise DataError(f"{key}={path!r} could not be read as {builder}: {_innermost(exc)}") from exc
    if len(dataset) == 0:
        raise DataError(f"{key}={path!r} holds no examples")
    try:
        return normalise_columns(dataset, f"{key}={path!r}")
    except UnicodeDecodeError:  # the JSON reader keeps bytes that are not UTF-8 until they are read
        where = _json_problem(resolved) or "is not UTF-8 text: save it as UTF-8"
        raise DataError(f"{key}={path!r} {where}") from None


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
def _split(task: TaskConfig, seed: int) -> tuple[Any, Any]:
    """(training pool, held-out set cut from the same data; empty when task.eval-path is set)."""
    if task.data_path:
        dataset = load_file(task.data_path).shuffle(seed=seed)
    elif task.name == "synthetic":
        from tasks.synthetic import synthetic_splits

        try:
            return synthetic_splits(task.num_train, 0 if task.eval_path else task.num_eval, seed)
        except ValueError as exc:  # more distinct held-out problems than a skill has
            raise DataError(
                f"task.num-eval={task.num_eval} is more than the synthetic task can hold out ({exc}); "
                "lower task.num-eval"
            ) from None
    else:
        dataset = load_hub(task.name).shuffle(seed=seed)
    if task.eval_path:  # the held-out set is its own file: the whole dataset trains
        return dataset, dataset.select([])
    if len(dataset) <= task.num_eval:
        raise DataError(
            f"the dataset has {len(dataset)} examples, not more than task.num-eval={task.num_eval}; "
            "lower task.num-eval, use more data, or give the held-out set as task.eval-path"
        )
    return dataset.select(range(task.num_eval, len(dataset))), dataset.select(range(task.num_eval))


def load_pool(task: TaskConfig, seed: int) -> Any:
    """The examples partitioned over nodes (never those the server evaluates on)."""
    return _split(task, seed)[0]


@lru_cache(maxsize=2)
def held_out(task: TaskConfig, seed: int) -> Any:
    """The server's evaluation examples: the task.eval-path file, else task.num-eval cut from the data."""
    if task.eval_path:
        return load_file(task.eval_path, key="task.eval-path")
    return _split(task, seed)[1]


def make_partitioner(task: TaskConfig, num_partitions: int, seed: int) -> Any:
    """The flwr-datasets partitioner the run config asks for."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if task.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=task.partition_by,
        alpha=task.alpha,
        min_partition_size=MIN_PARTITION_SIZE,
        self_balancing=True,
        seed=seed,
    )


def check_partition_column(task: TaskConfig, columns: list[str]) -> None:
    """DataError when the Dirichlet partitioner's column is not in the data (the columns are listed)."""
    if task.partitioner == "dirichlet" and task.partition_by not in columns:
        raise DataError(
            f"task.partition-by={task.partition_by!r} is not a column of the data (columns: "
            f"{', '.join(columns)}); name one of them or set task.partitioner='iid'"
        )


@lru_cache(maxsize=2)
def _partitioner_for(task: TaskConfig, num_partitions: int, seed: int) -> Any:
    pool = load_pool(task, seed)
    check_partition_column(task, list(pool.column_names))
    if len(pool) < MIN_PARTITION_SIZE * num_partitions:
        raise DataError(
            f"the training pool holds {len(pool)} examples, fewer than {MIN_PARTITION_SIZE} for each of "
            f"{num_partitions} partitions; use more data or fewer nodes"
        )
    partitioner = make_partitioner(task, num_partitions, seed)
    partitioner.dataset = pool
    return partitioner


def partition_sizes(task: TaskConfig, num_partitions: int, seed: int) -> list[int]:
    """How many pool examples each partition gets; DataError naming the setting when it cannot split."""
    partitioner = _partitioner_for(task, num_partitions, seed)
    try:
        return [len(partitioner.load_partition(pid)) for pid in range(num_partitions)]
    except ValueError as exc:  # flwr-datasets gives up when it cannot meet min_partition_size
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"task.partitioner={task.partitioner!r} (task.alpha={task.alpha}, task.partition-by="
            f"{task.partition_by!r}) cannot give each of {num_partitions} partitions {MIN_PARTITION_SIZE} "
            f"examples ({reason}); raise task.alpha, set task.partitioner='iid', or use more data"
        ) from None


def node_data(
    task: TaskConfig, partition_id: int, num_partitions: int, seed: int, data_path: str = ""
) -> tuple[Any, Any]:
    """(train, local eval) examples of one node: its own file if it has one, else its partition."""
    if data_path:
        dataset = load_file(data_path, key="node config data-path").shuffle(seed=seed)
    else:
        dataset = _partitioner_for(task, num_partitions, seed).load_partition(partition_id)
    if len(dataset) < MIN_PARTITION_SIZE:
        raise DataError(
            f"partition {partition_id} holds {len(dataset)} examples; it needs at least {MIN_PARTITION_SIZE}"
        )
    split = dataset.train_test_split(test_size=LOCAL_EVAL_SHARE, seed=seed) if len(dataset) >= 10 else None
    if split is None:
        return dataset, dataset.select(range(1))
    return split["train"], split["test"]
