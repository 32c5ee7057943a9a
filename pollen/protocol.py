"""Names of everything that travels in a Pollen message, in one place, and the parser of a round's knobs.

Server -> node (train / evaluate): ``ADAPTER`` (ArrayRecord, the encoded global adapter at the node's
rank) and ``CONFIG`` (ConfigRecord of round knobs). Node -> server (train): ``DELTA`` (ArrayRecord, the
encoded trained-minus-received factors), ``METRICS`` (MetricRecord) and ``META`` (ConfigRecord that
describes the update, checked by the strategy before it is aggregated).

One channel per knob: what a node trains or scores with in a round (rank, round, learning rate, local
steps, batch size, max-seq-len, seed, train-a, the uplink's bits, scheme and block size, error
feedback) comes only from ``CONFIG``, parsed once per message into :class:`RoundKnobs`. The run config
gives a node only what builds its worker and its data: model, quantization, device, LoRA config
(alpha, dropout, target modules), gradient checkpointing, the task and the seed of its data split.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pollen.config import RunConfig
from pollen.schedule import round_lr

# Record names inside a message's RecordDict.
ADAPTER: Final = "adapter"
CONFIG: Final = "config"
DELTA: Final = "delta"
METRICS: Final = "metrics"
META: Final = "meta"

# ConfigRecord keys, server -> node.
ROUND: Final = "server-round"
LOCAL_STEPS: Final = "local-steps"
LR: Final = "lr"
BATCH_SIZE: Final = "batch-size"
MAX_SEQ_LEN: Final = "max-seq-len"
RANK: Final = "rank"  # the rank of the adapter in ADAPTER, and the rank the node trains
SEED: Final = "seed"
FINGERPRINT: Final = "fingerprint"  # base-model fingerprint (pollen.targets.model_fingerprint)
UPLINK_BITS: Final = "uplink-bits"
UPLINK_SCHEME: Final = "uplink-scheme"
BLOCK_SIZE: Final = "block-size"
ERROR_FEEDBACK: Final = "error-feedback"
TRAIN_A: Final = "train-a"  # False freezes the A factors (FFA-LoRA)
# Downlink by change: ADAPTER holds (adapter - the node's view of version DOWNLINK_BASE), or the whole
# adapter when DOWNLINK_BASE is -1; the node then keeps the result as its view DOWNLINK_VERSION.
DOWNLINK_BASE: Final = "downlink-base"
DOWNLINK_VERSION: Final = "downlink-version"
NO_VIEW: Final = -1  # DOWNLINK_BASE of a message that carries the whole adapter

# ConfigRecord keys of a node's handshake reply (META of a query), besides RANK (0 = server decides),
# FINGERPRINT and QUANTIZATION.
PARTITION_ID: Final = "partition-id"
NUM_PARTITIONS: Final = "num-partitions"  # how many partitions the node's partition id is one of
OWN_DATA: Final = "own-data"  # True when the node trains on its own data-path, not a partition
DEVICE: Final = "device"

# MetricRecord keys, node -> server.
NUM_EXAMPLES: Final = "num-examples"  # the weight of the update in aggregation
TRAIN_LOSS: Final = "train-loss"
TRAIN_SECONDS: Final = "train-seconds"
EVAL_LOSS: Final = "eval-loss"
NUM_PROMPT_CUT: Final = "num-prompt-cut"  # training examples that lost prompt tokens to max-seq-len
PEAK_RSS_MB: Final = "peak-rss-mb"  # the node process's peak resident memory so far (aggregated as max)

# META keys, node -> server (RANK and FINGERPRINT as above).
LORA_SCALE: Final = "lora-scale"
QUANTIZATION: Final = "quantization"


def _present(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise ValueError(
            f"message config has no {key!r}: a Pollen server sends it with every train and evaluate message"
        )
    return record[key]


def config_number(record: Mapping[str, Any], key: str) -> float:
    """A numeric ConfigRecord value; ValueError naming the key when it is missing or not a number."""
    value = _present(record, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"message config {key}={value!r} is not a number")
    return value


def config_int(record: Mapping[str, Any], key: str) -> int:
    """An integer ConfigRecord value; ValueError naming the key otherwise."""
    value = config_number(record, key)
    if int(value) != value:
        raise ValueError(f"message config {key}={value!r} is not an integer")
    return int(value)


def config_bool(record: Mapping[str, Any], key: str) -> bool:
    """A boolean ConfigRecord value; ValueError naming the key otherwise."""
    value = _present(record, key)
    if not isinstance(value, bool):
        raise ValueError(f"message config {key}={value!r} is not a boolean")
    return value


def config_str(record: Mapping[str, Any], key: str) -> str:
    """A string ConfigRecord value; ValueError naming the key otherwise."""
    value = _present(record, key)
    if not isinstance(value, str):
        raise ValueError(f"message config {key}={value!r} is not a string")
    return value


@dataclass(frozen=True)
class RoundKnobs:
    """What a node trains and scores with in one round, as the server sent it in ``CONFIG``."""

    server_round: int
    rank: int  # the rank of the received adapter, and the rank the node trains
    lr: float
    local_steps: int
    batch_size: int
    max_seq_len: int
    seed: int  # the run's seed; a node derives its round's batch order and dropout from it
    train_a: bool  # False freezes the A factors (FFA-LoRA) and leaves them out of the delta
    uplink_bits: int
    uplink_scheme: str
    block_size: int
    error_feedback: bool

    def __post_init__(self) -> None:
        for key, value in (
            (RANK, self.rank),
            (LOCAL_STEPS, self.local_steps),
            (BATCH_SIZE, self.batch_size),
            (MAX_SEQ_LEN, self.max_seq_len),
            (BLOCK_SIZE, self.block_size),
        ):
            if value < 1:
                raise ValueError(f"message config {key}={value!r} is not valid: expected an integer >= 1")
        if not self.lr >= 0:  # a cosine schedule may end at train.lr-min = 0
            raise ValueError(f"message config {LR}={self.lr!r} is not valid: expected a number >= 0")


def parse_round_knobs(record: Mapping[str, Any]) -> RoundKnobs:
    """The round's knobs from a message's ``CONFIG``; ValueError naming the first missing or mistyped key."""
    return RoundKnobs(
        server_round=config_int(record, ROUND),
        rank=config_int(record, RANK),
        lr=float(config_number(record, LR)),
        local_steps=config_int(record, LOCAL_STEPS),
        batch_size=config_int(record, BATCH_SIZE),
        max_seq_len=config_int(record, MAX_SEQ_LEN),
        seed=config_int(record, SEED),
        train_a=config_bool(record, TRAIN_A),
        uplink_bits=config_int(record, UPLINK_BITS),
        uplink_scheme=config_str(record, UPLINK_SCHEME),
        block_size=config_int(record, BLOCK_SIZE),
        error_feedback=config_bool(record, ERROR_FEEDBACK),
    )


def round_settings(run: RunConfig, server_round: int) -> dict[str, int | float | str | bool]:
    """The knobs a server sends every node in ``server_round`` (the strategy adds round, rank, train-a
    and the fingerprint), the learning rate as scheduled."""
    t, wire = run.train, run.wire
    return {
        LOCAL_STEPS: t.local_steps,
        LR: round_lr(t.lr_schedule, t.lr, t.lr_min, server_round, run.num_server_rounds),
        BATCH_SIZE: t.batch_size,
        MAX_SEQ_LEN: t.max_seq_len,
        SEED: run.seed,
        UPLINK_BITS: wire.uplink_bits,
        UPLINK_SCHEME: wire.scheme,
        BLOCK_SIZE: wire.block_size,
        ERROR_FEEDBACK: wire.error_feedback,
    }


def knobs_for(run: RunConfig, rank: int, server_round: int = 1, train_a: bool = True) -> RoundKnobs:
    """The knobs a node of ``rank`` parses from a server running ``run`` (benchmarks and tests use it)."""
    record = {**round_settings(run, server_round), ROUND: server_round, RANK: rank, TRAIN_A: train_a}
    return parse_round_knobs(record)


# A node's error reply carries one line "<Type>: <message>" (client_app formats it so); Flower's own
# errors read "<class 'module.Type'>:<'message'>", possibly with a traceback inside the message.
_FLOWER_REASON = re.compile(r"^<class '(?:[\w.]*\.)?(\w+)'>:<'(.*)'>$", re.S)
_TRACEBACK_LAST = re.compile(r"^(?:[\w.]*\.)?(\w+(?:Error|Exception|Exit|Interrupt|Warning)): ?(.*)$")


def error_line(reason: str | None) -> str:
    """A node's error reason as one line, ``Type: message``, whatever wrapped it on the way."""
    text = (reason or "").strip()
    match = _FLOWER_REASON.match(text)
    if match:
        kind, text = match.group(1), match.group(2).strip()
        text = f"{kind}: {text}" if kind not in ("ClientAppException",) else text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1:  # a traceback: its last "SomeError: message" line says what happened
        found = [m for m in map(_TRACEBACK_LAST.match, lines) if m]
        lines = [f"{found[-1].group(1)}: {found[-1].group(2)}" if found else lines[-1]]
    line = lines[0] if lines else "unknown error"
    if line.startswith("Exception ClientAppException occurred. Message:"):
        line = line.split("Message:", 1)[1].strip()
    return line if len(line) <= 500 else line[:497] + "..."
