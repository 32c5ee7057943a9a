"""Names of everything that travels in a Pollen message, in one place.

Server -> node (train / evaluate): ``ADAPTER`` (ArrayRecord, the encoded global adapter at the node's
rank) and ``CONFIG`` (ConfigRecord of round knobs). Node -> server (train): ``DELTA`` (ArrayRecord, the
encoded trained-minus-received factors), ``METRICS`` (MetricRecord) and ``META`` (ConfigRecord that
describes the update, checked by the strategy before it is aggregated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

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


def config_number(record: Mapping[str, Any], key: str) -> float:
    """A numeric ConfigRecord value; ValueError naming the key when it is missing or not a number."""
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"message config {key}={value!r} is not a number")
    return value


def config_int(record: Mapping[str, Any], key: str) -> int:
    """An integer ConfigRecord value; ValueError naming the key otherwise."""
    value = config_number(record, key)
    if int(value) != value:
        raise ValueError(f"message config {key}={value!r} is not an integer")
    return int(value)


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
