"""Run and node configuration: parsed once, validated together, frozen.

Every default lives in ``pyproject.toml`` ([tool.flwr.app.config]) with a comment. This module is the
only place that reads ``run_config`` / ``node_config`` keys; the rest of Pollen gets dataclasses.
All problems are collected and raised as one :class:`ConfigError`, one line per problem, each naming
the key, the bad value and what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pollen.schedule import SCHEDULES

QUANTIZATIONS = ("4bit", "8bit", "none")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
PARTITIONERS = ("dirichlet", "iid")
PROMPT_FORMATS = ("auto", "alpaca", "chat")  # tasks/prompts.py
TASK_METRICS = ("auto", "exact", "label", "choice", "loss")  # tasks/metrics.py
STRATEGIES = ("fedavg", "zeropad", "flora", "flexlora", "ffa")
WIRE_BITS = (32, 16, 8, 4)
WIRE_SCHEMES = ("absmax", "nf4")
# task.num-train generates the synthetic examples in memory: a million take about 15 s and 0.5 GB,
# far more than a run trains on; 10**8 took 16 GB before anything else ran.
MAX_NUM_TRAIN = 1_000_000
MAX_RUN_NAME = 100  # characters of output.run-name (one folder name on every file system)


class ConfigError(ValueError):
    """One or more configuration problems; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ModelConfig:
    name: str  # "embedded", "smollm2-135m", a local folder, or a Hugging Face id
    quantization: str  # one of QUANTIZATIONS
    device: str  # "auto", "cpu", "cuda", "cuda:N"
    compute_dtype: str  # one of COMPUTE_DTYPES


@dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int
    lr: float
    batch_size: int
    max_seq_len: int
    lr_schedule: str = "constant"  # "constant" or "cosine" over the rounds (pollen/schedule.py)
    lr_min: float = 0.0  # the cosine schedule's rate at the last round
    gradient_checkpointing: bool = False  # recompute decoder-layer activations in the backward pass
    micro_batch_size: int = 0  # rows per forward/backward pass, gradients summed per step (0 = whole batch)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    data_path: str
    partitioner: str
    alpha: float
    partition_by: str
    num_train: int
    num_eval: int
    max_new_tokens: int
    eval_path: str = ""  # a local file that is the server's held-out set ("" = cut num_eval from the data)
    prompt_format: str = "auto"  # one of PROMPT_FORMATS
    metric: str = "auto"  # one of TASK_METRICS
    labels: tuple[str, ...] = ()  # the label set of a label task; () = the distinct outputs of the data


@dataclass(frozen=True)
class StrategyConfig:
    name: str
    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    round_timeout: float
    rank_plan: tuple[int, ...]  # ranks cycled over nodes by partition id; () = every node lora.rank
    norm_weighted: bool
    ffa_lr_multiplier: float  # ffa only: nodes train B with train.lr times this
    max_rank: int  # largest rank a node may train (handshake bound)
    max_update_ratio: float  # update norm bound, as a multiple of the norm of what the node was sent
    max_node_examples: int  # cap on the weight (examples) one update counts for


@dataclass(frozen=True)
class WireConfig:
    uplink_bits: int
    downlink_bits: int
    block_size: int
    error_feedback: bool
    scheme: str


@dataclass(frozen=True)
class OutputConfig:
    dir: str
    run_name: str
    resume: bool  # continue output.run-name from its checkpoint


@dataclass(frozen=True)
class EvalConfig:
    """When the server evaluates the global adapter (server_app/evaluation.py)."""

    every: int = 1  # evaluate after every this many rounds, and always after round 0 and the last round
    background: bool = True  # evaluate round r's adapter in a thread while round r+1 trains


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs, resolved from the run config."""

    num_server_rounds: int
    seed: int
    output: OutputConfig
    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    task: TaskConfig
    strategy: StrategyConfig
    wire: WireConfig
    evaluation: EvalConfig = EvalConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (for the resolved-config file of a run)."""
        return asdict(self)


@dataclass(frozen=True)
class NodeConfig:
    """What one SuperNode says about itself (``--node-config`` or the simulation's partition ids)."""

    partition_id: int
    num_partitions: int
    data_path: str = ""  # the node's own Alpaca-style file; overrides the run's task data
    lora_rank: int = 0  # 0 = use the rank the server asks for
    device: str = ""  # "" = the run's model.device


# ---------------------------------------------------------------------------------------------
# The key table: run-config key -> (kind, check, what is accepted). Order follows pyproject.toml.
# ---------------------------------------------------------------------------------------------

Check = Callable[[Any], bool]


@dataclass(frozen=True)
class _Key:
    kind: type
    check: Check = field(default=lambda _v: True)
    accepted: str = ""


def _one_of(options: tuple[Any, ...]) -> _Key:
    kind = type(options[0])
    return _Key(kind, lambda v: v in options, "one of " + ", ".join(repr(o) for o in options))


def _device_ok(value: str) -> bool:
    if value in ("auto", "cpu", "cuda", "mps"):
        return True
    return value.startswith("cuda:") and value[5:].isdigit()


def _run_name_ok(value: str) -> bool:
    """A plain folder name: no path separator, not '.' or '..', no control character, not too long."""
    return (
        len(value) <= MAX_RUN_NAME
        and not any(sep in value for sep in ("/", "\\"))
        and value not in (".", "..")
        and all(ord(ch) >= 32 and ord(ch) != 127 for ch in value)
    )


_POSITIVE_INT = _Key(int, lambda v: v >= 1, "an integer >= 1")
_FRACTION = _Key(float, lambda v: 0.0 <= v <= 1.0, "a number from 0.0 to 1.0")

_RUN_KEYS: dict[str, _Key] = {
    "num-server-rounds": _POSITIVE_INT,
    "seed": _Key(int, lambda v: v >= 0, "an integer >= 0"),
    "output.dir": _Key(str, lambda v: v.strip() != "" and "\0" not in v, "a non-empty folder path"),
    "output.run-name": _Key(
        str,
        _run_name_ok,
        f"a plain folder name (no '/' or '\\', not '.' or '..', no control characters, at most "
        f"{MAX_RUN_NAME} characters), or empty for a timestamp",
    ),
    "output.resume": _Key(bool, accepted="true or false"),
    "model.name": _Key(
        str,
        lambda v: v.strip() != "",
        "'embedded', 'smollm2-135m', a local model folder, or a Hugging Face id",
    ),
    "model.quantization": _one_of(QUANTIZATIONS),
    "model.device": _Key(str, _device_ok, "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    "model.compute-dtype": _one_of(COMPUTE_DTYPES),
    "lora.rank": _Key(int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "lora.alpha": _Key(float, lambda v: v > 0, "a number > 0"),
    "lora.dropout": _Key(float, lambda v: 0.0 <= v < 1.0, "a number from 0.0 up to (not including) 1.0"),
    "lora.target-modules": _Key(
        str,
        lambda v: (
            v.strip() == "all-linear" or all(part.strip() not in ("", "all-linear") for part in v.split(","))
        ),
        "'all-linear' (every linear layer but the output head) or comma-separated module names "
        "such as 'q_proj,v_proj'",
    ),
    "train.local-steps": _POSITIVE_INT,
    "train.lr": _Key(float, lambda v: 0 < v < 1, "a number between 0 and 1"),
    "train.lr-schedule": _one_of(SCHEDULES),
    "train.lr-min": _Key(float, lambda v: 0 <= v < 1, "a number from 0 up to (not including) 1"),
    "train.batch-size": _POSITIVE_INT,
    "train.max-seq-len": _Key(int, lambda v: v >= 8, "an integer >= 8"),
    "train.gradient-checkpointing": _Key(bool, accepted="true or false"),
    "train.micro-batch-size": _Key(
        int, lambda v: v >= 0, "0 (the whole batch in one pass) or an integer >= 1"
    ),
    "task.name": _Key(
        str, lambda v: v.strip() != "", "'synthetic', 'alpaca', 'finance', 'medical', 'code' or a dataset id"
    ),
    "task.data-path": _Key(str),
    "task.eval-path": _Key(str, accepted="a local .json, .jsonl, .csv or .parquet file, or empty"),
    "task.partitioner": _one_of(PARTITIONERS),
    "task.alpha": _Key(float, lambda v: v > 0, "a number > 0"),
    "task.partition-by": _Key(str, lambda v: v.strip() != "", "a column name"),
    "task.num-train": _Key(int, lambda v: 10 <= v <= MAX_NUM_TRAIN, f"an integer from 10 to {MAX_NUM_TRAIN}"),
    "task.num-eval": _POSITIVE_INT,
    "task.max-new-tokens": _POSITIVE_INT,
    "task.prompt-format": _one_of(PROMPT_FORMATS),
    "task.metric": _one_of(TASK_METRICS),
    "task.labels": _Key(
        str,
        lambda v: v.strip() == "" or all(part.strip() for part in v.split(",")),
        "comma-separated labels such as 'positive,negative,neutral', or empty",
    ),
    "strategy.name": _one_of(STRATEGIES),
    "strategy.fraction-train": _Key(float, lambda v: 0.0 < v <= 1.0, "a number above 0.0, up to 1.0"),
    "strategy.fraction-evaluate": _FRACTION,
    "eval.every": _POSITIVE_INT,
    "eval.background": _Key(bool, accepted="true or false"),
    "strategy.min-nodes": _POSITIVE_INT,
    "strategy.round-timeout": _Key(float, lambda v: v > 0, "a number of seconds > 0"),
    "strategy.rank-plan": _Key(
        str,
        lambda v: v.strip() == "" or all(p.strip().isdigit() and 1 <= int(p) <= 4096 for p in v.split(",")),
        "comma-separated ranks from 1 to 4096 such as '2,4,8,16', or empty",
    ),
    "strategy.norm-weighted": _Key(bool, accepted="true or false"),
    "strategy.ffa-lr-multiplier": _Key(float, lambda v: 0 < v <= 1000, "a number above 0, up to 1000"),
    "strategy.max-rank": _Key(int, lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
    "strategy.max-update-ratio": _Key(float, lambda v: 0 < v <= 1e6, "a number above 0, up to 1e6"),
    "strategy.max-node-examples": _Key(int, lambda v: v >= 1, "an integer >= 1"),
    "wire.uplink-bits": _one_of(WIRE_BITS),
    "wire.downlink-bits": _one_of(WIRE_BITS),
    "wire.block-size": _Key(int, lambda v: 2 <= v <= 65536, "an integer from 2 to 65536"),
    "wire.error-feedback": _Key(bool, accepted="true or false"),
    "wire.scheme": _one_of(WIRE_SCHEMES),
}

# Keys every run config may carry that Pollen does not read (Flower's own, or documented extras).
_IGNORED_KEYS: frozenset[str] = frozenset()


def known_run_keys() -> tuple[str, ...]:
    """All run-config keys Pollen reads (the same set pyproject.toml documents)."""
    return tuple(_RUN_KEYS)


def _coerce(key: str, raw: Any, spec: _Key, problems: list[str]) -> Any:
    """Type-check one value (ints are accepted where floats are expected); None on failure."""
    value = raw
    if spec.kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        value = float(raw)
    if spec.kind is int and isinstance(raw, bool):
        value = None
    if value is None or not isinstance(value, spec.kind):
        accepted = spec.accepted or spec.kind.__name__
        problems.append(f"{key}={raw!r} is not valid: expected {accepted}")
        return None
    if isinstance(value, float) and not math.isfinite(value):  # inf passes every bound check, nan none
        problems.append(f"{key}={raw!r} is not valid: expected {spec.accepted or 'a number'}, not inf or nan")
        return None
    if not spec.check(value):
        problems.append(f"{key}={raw!r} is not valid: expected {spec.accepted}")
        return None
    return value


def _rank_plan(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",")) if text.strip() else ()


def _wire_problems(values: Mapping[str, Any]) -> list[str]:
    """The uplink and downlink as the codec builds them: each combination it refuses, by config key."""
    from pollen.codec import WireSpec  # lazy: the codec imports torch and flwr

    scheme, block_size = values["wire.scheme"], values["wire.block-size"]
    problems = []
    for key in ("wire.uplink-bits", "wire.downlink-bits"):
        bits = values[key]
        try:
            WireSpec(bits=bits, scheme=scheme, block_size=block_size)
        except ValueError as exc:
            if scheme == "nf4" and bits != 4:
                problems.append(
                    f"{key}={bits} does not fit wire.scheme='nf4': NF4 codes 4-bit payloads only, and the "
                    f"scheme applies to both directions; set {key}=4 or use wire.scheme='absmax'"
                )
            else:
                reason = str(exc).replace("WireSpec.block_size", "wire.block-size")
                reason = reason.replace("WireSpec.scheme", "wire.scheme").replace("WireSpec.bits", key)
                problems.append(f"{key}={bits} with wire.scheme={scheme!r} is refused by the codec: {reason}")
    return problems


def parse_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Validate a Flower run config and return it as a frozen :class:`RunConfig`.

    Raises :class:`ConfigError` listing every unknown key, missing key and bad value at once.
    """
    problems: list[str] = []
    unknown = sorted(set(run_config) - set(_RUN_KEYS) - _IGNORED_KEYS)
    for key in unknown:
        close = [k for k in _RUN_KEYS if k.split(".")[-1] == key.split(".")[-1]]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        problems.append(f"{key} is not a Pollen config key{hint}; known keys are listed in pyproject.toml")
    values: dict[str, Any] = {}
    for key, spec in _RUN_KEYS.items():
        if key not in run_config:
            problems.append(f"{key} is missing from the run config: add it to [tool.flwr.app.config]")
            continue
        values[key] = _coerce(key, run_config[key], spec, problems)
    if not problems:
        too_big = sorted(
            {values["lora.rank"], *_rank_plan(values["strategy.rank-plan"])}
            - set(range(values["strategy.max-rank"] + 1))
        )
        if too_big:
            problems.append(
                f"rank {too_big[-1]} (lora.rank or strategy.rank-plan) is above strategy.max-rank="
                f"{values['strategy.max-rank']}: raise strategy.max-rank or use smaller ranks"
            )
        if values["train.lr-schedule"] == "cosine" and values["train.lr-min"] > values["train.lr"]:
            problems.append(
                f"train.lr-min={values['train.lr-min']} is above train.lr={values['train.lr']}: "
                "the cosine schedule decays from train.lr down to train.lr-min, so use a smaller value"
            )
        if values["task.labels"].strip() and values["task.metric"] not in ("auto", "label"):
            problems.append(
                f"task.labels={values['task.labels']!r} is set but task.metric={values['task.metric']!r} "
                "does not use labels: set task.metric='label' (or 'auto'), or leave task.labels empty"
            )
        if values["output.resume"] and not values["output.run-name"]:
            problems.append("output.resume=true needs output.run-name: name the run folder to continue")
        problems.extend(_wire_problems(values))
    if problems:
        raise ConfigError(problems)
    v = values
    return RunConfig(
        num_server_rounds=v["num-server-rounds"],
        seed=v["seed"],
        output=OutputConfig(dir=v["output.dir"], run_name=v["output.run-name"], resume=v["output.resume"]),
        model=ModelConfig(
            name=v["model.name"],
            quantization=v["model.quantization"],
            device=v["model.device"],
            compute_dtype=v["model.compute-dtype"],
        ),
        lora=LoraConfig(
            rank=v["lora.rank"],
            alpha=v["lora.alpha"],
            dropout=v["lora.dropout"],
            target_modules=tuple(part.strip() for part in v["lora.target-modules"].split(",")),
        ),
        train=TrainConfig(
            local_steps=v["train.local-steps"],
            lr=v["train.lr"],
            batch_size=v["train.batch-size"],
            max_seq_len=v["train.max-seq-len"],
            lr_schedule=v["train.lr-schedule"],
            lr_min=v["train.lr-min"],
            gradient_checkpointing=v["train.gradient-checkpointing"],
            micro_batch_size=v["train.micro-batch-size"],
        ),
        task=TaskConfig(
            name=v["task.name"],
            data_path=v["task.data-path"],
            partitioner=v["task.partitioner"],
            alpha=v["task.alpha"],
            partition_by=v["task.partition-by"],
            num_train=v["task.num-train"],
            num_eval=v["task.num-eval"],
            max_new_tokens=v["task.max-new-tokens"],
            eval_path=v["task.eval-path"],
            prompt_format=v["task.prompt-format"],
            metric=v["task.metric"],
            labels=tuple(p.strip() for p in v["task.labels"].split(",")) if v["task.labels"].strip() else (),
        ),
        strategy=StrategyConfig(
            name=v["strategy.name"],
            fraction_train=v["strategy.fraction-train"],
            fraction_evaluate=v["strategy.fraction-evaluate"],
            min_nodes=v["strategy.min-nodes"],
            round_timeout=v["strategy.round-timeout"],
            rank_plan=_rank_plan(v["strategy.rank-plan"]),
            norm_weighted=v["strategy.norm-weighted"],
            ffa_lr_multiplier=v["strategy.ffa-lr-multiplier"],
            max_rank=v["strategy.max-rank"],
            max_update_ratio=v["strategy.max-update-ratio"],
            max_node_examples=v["strategy.max-node-examples"],
        ),
        wire=WireConfig(
            uplink_bits=v["wire.uplink-bits"],
            downlink_bits=v["wire.downlink-bits"],
            block_size=v["wire.block-size"],
            error_feedback=v["wire.error-feedback"],
            scheme=v["wire.scheme"],
        ),
        evaluation=EvalConfig(every=v["eval.every"], background=v["eval.background"]),
    )


# Node-config keys: Flower's simulation sets partition-id / num-partitions; operators set the rest
# with `flower-supernode --node-config "data-path='...' lora-rank=16"`.
_NODE_KEYS: dict[str, _Key] = {
    "partition-id": _Key(int, lambda v: v >= 0, "an integer >= 0"),
    "num-partitions": _POSITIVE_INT,
    "data-path": _Key(str),
    "lora-rank": _Key(int, lambda v: 0 <= v <= 4096, "an integer from 0 (server decides) to 4096"),
    "device": _Key(str, lambda v: v == "" or _device_ok(v), "'', 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
}


def parse_node_config(node_config: Mapping[str, Any]) -> NodeConfig:
    """Validate a node config. ``partition-id``/``num-partitions`` default to 0/1 for a lone node."""
    problems: list[str] = []
    for key in sorted(set(node_config) - set(_NODE_KEYS)):
        problems.append(f"node config key {key!r} is not known; accepted keys: {', '.join(_NODE_KEYS)}")
    values: dict[str, Any] = {}
    for key, spec in _NODE_KEYS.items():
        if key in node_config:
            values[key] = _coerce(f"node config {key}", node_config[key], spec, problems)
    if problems:
        raise ConfigError(problems)
    partition_id = values.get("partition-id", 0)
    num_partitions = values.get("num-partitions", 1)
    if partition_id >= num_partitions:
        raise ConfigError(
            [f"node config partition-id={partition_id} must be below num-partitions={num_partitions}"]
        )
    return NodeConfig(
        partition_id=partition_id,
        num_partitions=num_partitions,
        data_path=values.get("data-path", ""),
        lora_rank=values.get("lora-rank", 0),
        device=values.get("device", ""),
    )
