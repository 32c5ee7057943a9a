"""One federated round as the ServerApp runs it, with every byte on the wire measured."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P
from pollen.adapter import Adapter
from pollen.codec import CodecError, describe, fp32_sized, serialized_nbytes
from server_app.failures import FederationError, round_failure
from strategies.base import LoraStrategy

log = logging.getLogger("pollen")
# Byte accounting never builds a float32 twin larger than this (a real adapter is far smaller).
MAX_FP32_NUMEL = 2**28


def _bytes(messages: list[Message]) -> int:
    """Serialized size of every message's content (errors carry no payload)."""
    return sum(serialized_nbytes(m.content) for m in messages if not m.has_error())


def _bytes_fp32(messages: list[Message], from_nodes: Collection[int] | None = None) -> int:
    """What the same messages would weigh with their adapter payload sent as plain float32.

    Each payload's layout (names and shapes, read without decoding) is re-encoded at 32 bits, so the
    figure is measured on a real record of the same tensors, never estimated, and no payload is decoded
    for it. Replies count with a float32 twin only when ``from_nodes`` holds their sender (the replies
    the strategy accepted, whose layout it checked); any other reply, and an unreadable or oversized
    payload, counts as sent.
    """
    total = 0
    for message in messages:
        if message.has_error():
            continue
        if from_nodes is not None and message.metadata.src_node_id not in from_nodes:
            total += serialized_nbytes(message.content)
            continue
        content = message.content
        records = {}
        for name, record in content.items():
            if name in (P.ADAPTER, P.DELTA) and isinstance(record, ArrayRecord):
                try:
                    layout = describe(record)
                    if layout.numel <= MAX_FP32_NUMEL:
                        record = fp32_sized(layout)
                except CodecError:
                    pass
            records[name] = record
        total += serialized_nbytes(RecordDict(records))
    return total


def run_round(
    grid: Grid,
    strategy: LoraStrategy,
    server_round: int,
    global_adapter: Adapter,
    config: ConfigRecord,
    timeout: float,
    evaluate_nodes: bool = True,
) -> tuple[Adapter, dict[str, Any]]:
    """One round: train on sampled nodes, aggregate, and (``evaluate_nodes``, per strategy.fraction-evaluate)
    evaluate the new global on nodes; returns the new global and the round's metrics row."""
    started = time.perf_counter()
    messages = strategy.train_messages(server_round, global_adapter, config, grid)
    downlink, downlink_fp32 = _bytes(messages), _bytes_fp32(messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    _stop_if_broken("train", server_round, len(messages), replies)
    new_adapter, train_metrics = strategy.aggregate(server_round, replies)
    report = strategy.report
    uplink, uplink_fp32 = _bytes(replies), _bytes_fp32(replies, report.accepted_nodes)
    if new_adapter is None:
        log.warning(
            "round %d: no usable update (%d rejected); the global adapter is unchanged",
            server_round,
            len(report.rejected),
        )
        new_adapter = global_adapter
    row: dict[str, Any] = {
        "round": server_round,
        "lr": _metric(config, P.LR),  # the round's rate as scheduled, before a strategy's multiple
        "train_loss": _metric(train_metrics, P.TRAIN_LOSS),
        "train_seconds": _metric(train_metrics, P.TRAIN_SECONDS),
        "client_peak_rss_mb": _metric(train_metrics, P.PEAK_RSS_MB),
        "train_examples_prompt_cut": _metric(train_metrics, P.NUM_PROMPT_CUT),
        "fit_seconds": time.perf_counter() - started,
        "nodes_sent": len(messages),
        "nodes_accepted": report.accepted,
        "nodes_rejected": len(report.rejected),
        "uplink_bytes": uplink,
        "downlink_bytes": downlink,
        "uplink_bytes_fp32": uplink_fp32,
        "downlink_bytes_fp32": downlink_fp32,
    }
    eval_messages = (
        strategy.evaluate_messages(server_round, new_adapter, config, grid) if evaluate_nodes else []
    )
    if eval_messages:
        row["downlink_bytes"] += _bytes(eval_messages)
        row["downlink_bytes_fp32"] += _bytes_fp32(eval_messages)
        eval_replies = list(grid.send_and_receive(eval_messages, timeout=timeout))
        _stop_if_broken("evaluate", server_round, len(eval_messages), eval_replies)
        row["uplink_bytes"] += _bytes(eval_replies)
        row["uplink_bytes_fp32"] += _bytes(eval_replies)  # evaluation replies carry no adapter
        federated = strategy.aggregate_evaluate(server_round, eval_replies)
        row["federated_eval_loss"] = _metric(federated, P.EVAL_LOSS)
    return new_adapter, row


def _stop_if_broken(kind: str, server_round: int, asked: int, replies: list[Message]) -> None:
    """FederationError when the replies show that the federation, not one node, is broken."""
    errors = [P.error_line(r.error.reason) for r in replies if r.has_error()]
    reason = round_failure(kind, server_round, asked, errors, len(replies))
    if reason is not None:
        raise FederationError(reason)


def _metric(record: Any, key: str) -> float | None:
    if record is None or key not in record:
        return None
    value = float(record[key])
    return value if math.isfinite(value) else None


def _figure(value: Any, digits: int) -> str:
    """A figure of the progress line; ``n/a`` where it was not computed (no examples, no replies)."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def progress_line(row: dict[str, Any], rounds: int, metric_name: str | None = "exact_match") -> str:
    """The console line of a finished round (``metric_name``: the task metric's key in ``row``)."""
    up, down = row["uplink_bytes"], row["downlink_bytes"]
    lr = row.get("lr")
    metric = f" | {metric_name} {_figure(row.get(metric_name), 3)}" if metric_name else ""
    baseline = row.get("majority_baseline")
    metric += "" if baseline is None else f" (majority {baseline:.3f})"
    evaluation = f" | eval_loss {_figure(row.get('eval_loss'), 4)}{metric}"
    if row.get("evaluated") is False:
        evaluation = " | not evaluated (eval.every)"
    return (
        f"round {row['round']}/{rounds}{evaluation}"
        f" | train_loss {_figure(row.get('train_loss'), 4)}"
        f" | lr {'n/a' if lr is None else f'{lr:.2e}'}"
        f" | nodes {row['nodes_accepted']}/{row['nodes_sent']}"
        f" | up {up / 1e6:.3f} MB ({_ratio(up, row['uplink_bytes_fp32'])})"
        f" | down {down / 1e6:.3f} MB ({_ratio(down, row['downlink_bytes_fp32'])})"
        f" | {row['round_seconds']:.1f} s"
    )


def _ratio(sent: int, fp32: int) -> str:
    """'0.13x fp32': how the bytes sent compare with plain float32 payloads."""
    return f"{sent / fp32:.2f}x fp32" if fp32 else "n/a"
