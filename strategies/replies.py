"""What the server does with train replies before any math: validate, decode, drop outliers, average metrics.

Plain functions over Flower messages. A reply that fails a check raises with the reason; the strategy
logs it and leaves the reply out, and the round goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from flwr.app import Message, MetricRecord

from pollen import protocol as P
from pollen.adapter import Adapter, add, unflatten
from pollen.codec import CodecError, decode

# A delta this many times larger than the round's median is treated as broken or hostile.
OUTLIER_FACTOR = 20.0
# Exceptions that mean "this reply is unusable" (anything else is a bug and propagates).
REJECTED = (CodecError, KeyError, ValueError, TypeError)


@dataclass(frozen=True)
class NodeUpdate:
    """One accepted reply: what the node was sent (as it decoded it) and the delta it trained."""

    node_id: int
    rank: int
    sent: Adapter
    delta: Adapter
    weight: float

    def trained(self) -> Adapter:
        """The node's adapter after local training (sent + delta, factor by factor)."""
        return add(self.sent, self.delta)


def rank_of_adapter(adapter: Adapter) -> int:
    """The rank shared by every pair of ``adapter``."""
    return next(iter(adapter.values())).rank


def rank_scale(adapter: Adapter) -> float:
    """The scale shared by every pair of ``adapter`` (a node's ``alpha / rank``)."""
    return next(iter(adapter.values())).scale


def accept_train_reply(
    reply: Message, sent: Mapping[int, Adapter], fingerprint: str, trains_a: bool
) -> NodeUpdate:
    """Check one train reply against what its node was sent and decode its delta; raises with the reason."""
    if reply.has_error():
        raise ValueError(f"the node reported an error: {P.error_line(reply.error.reason)}")
    node = reply.metadata.src_node_id
    content = reply.content
    for name, records in (
        (P.DELTA, content.array_records),
        (P.METRICS, content.metric_records),
        (P.META, content.config_records),
    ):
        if name not in records:
            raise KeyError(f"reply has no {name!r} record")
    meta, metrics = content.config_records[P.META], content.metric_records[P.METRICS]
    if meta.get(P.FINGERPRINT) != fingerprint:
        raise ValueError(
            f"base-model fingerprint {meta.get(P.FINGERPRINT)!r} differs from the server's "
            f"{fingerprint!r}: the node runs another base model"
        )
    adapter = sent.get(node)
    if adapter is None:
        raise ValueError("the node was not asked to train this round")
    rank = rank_of_adapter(adapter)
    if meta.get(P.RANK) != rank:
        raise ValueError(f"declares rank {meta.get(P.RANK)!r}, but was sent rank {rank}")
    weight = metrics.get(P.NUM_EXAMPLES)
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"num-examples={weight!r} must be a positive number")
    scale = meta.get(P.LORA_SCALE)
    expected_scale = rank_scale(adapter)
    if not isinstance(scale, float) or not math.isclose(scale, expected_scale, rel_tol=1e-6):
        raise ValueError(f"lora-scale={scale!r} differs from alpha / rank = {expected_scale}")
    tensors = decode(content.array_records[P.DELTA])
    if not trains_a:
        if any(name.endswith(".A") for name in tensors):
            raise ValueError("sent A factors, but this strategy keeps A frozen")
        tensors.update({m + ".A": torch.zeros_like(p.a) for m, p in adapter.items()})
    delta = unflatten(tensors, scale=scale)
    if delta.keys() != adapter.keys():
        raise ValueError("the delta covers other modules than the global adapter")
    for module, pair in delta.items():
        ref = adapter[module]
        if pair.a.shape != ref.a.shape or pair.b.shape != ref.b.shape:
            raise ValueError(
                f"{module}: A{tuple(pair.a.shape)} B{tuple(pair.b.shape)} do not match "
                f"A{tuple(ref.a.shape)} B{tuple(ref.b.shape)} of rank {rank}"
            )
        if not (torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()):
            raise ValueError(f"{module}: the delta holds non-finite values")
    return NodeUpdate(node_id=node, rank=rank, sent=adapter, delta=delta, weight=float(weight))


def outliers(updates: Sequence[NodeUpdate]) -> list[tuple[int, str]]:
    """(index, reason) of each delta whose norm is over OUTLIER_FACTOR times the median (needs 3+)."""
    if len(updates) < 3:
        return []
    norms = [delta_norm(u.delta) for u in updates]
    median = sorted(norms)[len(norms) // 2]
    return [
        (i, f"delta norm {norm:.3g} is over {OUTLIER_FACTOR}x the round median {median:.3g}")
        for i, norm in enumerate(norms)
        if median > 0 and norm > OUTLIER_FACTOR * median
    ]


def delta_norm(adapter: Adapter) -> float:
    """Euclidean norm of all factors of ``adapter`` together."""
    return math.sqrt(sum(float(p.a.pow(2).sum() + p.b.pow(2).sum()) for p in adapter.values()))


def weighted_metrics(records: Sequence[MetricRecord], weights: Sequence[float]) -> MetricRecord:
    """Weighted mean of each numeric metric; counts are summed, peak memory is the maximum."""
    out: dict[str, int | float | list[int] | list[float]] = {}
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    for key in sorted(keys):
        pairs: list[tuple[float, float]] = []
        for record, weight in zip(records, weights, strict=True):
            value = record.get(key)
            if isinstance(value, (int, float)):
                pairs.append((float(value), weight))
        if key in (P.NUM_EXAMPLES, P.NUM_PROMPT_CUT):
            out[key] = sum(v for v, _ in pairs)
        elif key == P.PEAK_RSS_MB:
            out[key] = max(v for v, _ in pairs)
        else:
            out[key] = sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1e-12)
    return MetricRecord(out)
