"""What the server does with train replies before any math: validate, decode, drop outliers, average metrics.

Plain functions over Flower messages. A reply that fails a check raises with the reason; the strategy
logs it and leaves the reply out, and the round goes on with the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from flwr.app import Message, MetricRecord

from pollen import protocol as P
from pollen.adapter import Adapter, LoraFactors, add, unflatten
from pollen.codec import CodecError, Layout, WireSpec, decode, describe, shown

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


@dataclass(frozen=True)
class ReplyRules:
    """What the server accepts in a train reply, beyond matching what the node was sent."""

    fingerprint: str  # the server's base model
    trains_a: bool  # False: the delta holds B factors only (FFA-LoRA)
    uplink: WireSpec  # the run's uplink: bits, scheme and block size a reply must use
    max_update_ratio: float  # strategy.max-update-ratio: delta norm over the norm of what was sent
    max_examples: int  # strategy.max-node-examples: the most one update counts for
    partition_sizes: Mapping[int, int] = field(default_factory=dict)  # node id -> examples it holds


def expected_layout(sent: Adapter, trains_a: bool) -> dict[str, tuple[int, ...]]:
    """Names and shapes a delta of ``sent`` must have: ``<module>.A`` and ``.B`` (B only with A frozen)."""
    out: dict[str, tuple[int, ...]] = {}
    for module, pair in sent.items():
        if trains_a:
            out[module + ".A"] = tuple(pair.a.shape)
        out[module + ".B"] = tuple(pair.b.shape)
    return out


def check_layout(layout: Layout, expected: Mapping[str, tuple[int, ...]], uplink: WireSpec) -> None:
    """ValueError unless a delta's header and index are exactly what the server expects (nothing decoded)."""
    spec = layout.spec
    if (spec.bits, spec.scheme, spec.block_size) != (uplink.bits, uplink.scheme, uplink.block_size):
        raise ValueError(
            f"the delta is encoded {spec.bits}-bit {spec.scheme} in blocks of {spec.block_size}; this run's "
            f"uplink is {uplink.bits}-bit {uplink.scheme} in blocks of {uplink.block_size}"
        )
    got = dict(zip(layout.names, layout.shapes, strict=True))
    if got.keys() != expected.keys():
        missing = sorted(set(expected) - set(got))[:2]
        extra = [shown(n) for n in sorted(set(got) - set(expected))[:2]]
        raise ValueError(
            f"the delta's tensors differ from the adapter sent: missing {missing}, extra {extra}"
        )
    for name, shape in expected.items():
        if got[name] != shape:
            raise ValueError(f"{name} has shape {got[name]}, the adapter sent has {shape}")


def accept_train_reply(reply: Message, sent: Mapping[int, Adapter], rules: ReplyRules) -> NodeUpdate:
    """Check one train reply against what its node was sent and decode its delta; raises with the reason.

    Everything is checked that can be without decoding (metadata, weight, the delta's layout and wire
    spec) before the payload is decoded, once; then the delta must be finite and within the update bound.
    """
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
    if meta.get(P.FINGERPRINT) != rules.fingerprint:
        raise ValueError(
            f"base-model fingerprint {str(meta.get(P.FINGERPRINT))[:80]!r} differs from the server's "
            f"{rules.fingerprint!r}: the node runs another base model"
        )
    adapter = sent.get(node)
    if adapter is None:
        raise ValueError("the node was not asked to train this round")
    rank = rank_of_adapter(adapter)
    if meta.get(P.RANK) != rank:
        raise ValueError(f"declares rank {str(meta.get(P.RANK))[:40]}, but was sent rank {rank}")
    weight = metrics.get(P.NUM_EXAMPLES)
    if (
        isinstance(weight, bool)
        or not isinstance(weight, (int, float))
        or not math.isfinite(weight)
        or weight <= 0
    ):
        raise ValueError(f"num-examples={str(weight)[:40]} must be a positive number")
    held = rules.partition_sizes.get(node)
    if held is not None and weight > held:
        raise ValueError(f"claims {weight:.4g} examples, but its partition holds {held}")
    scale = meta.get(P.LORA_SCALE)
    expected_scale = rank_scale(adapter)
    if not isinstance(scale, float) or not math.isclose(scale, expected_scale, rel_tol=1e-6):
        raise ValueError(f"lora-scale={str(scale)[:40]} differs from alpha / rank = {expected_scale}")
    expected = expected_layout(adapter, rules.trains_a)
    record = content.array_records[P.DELTA]
    check_layout(describe(record, max_tensors=len(expected)), expected, rules.uplink)
    tensors = decode(record)
    if not rules.trains_a:
        tensors.update({m + ".A": torch.zeros_like(p.a) for m, p in adapter.items()})
    delta = unflatten(tensors, scale=scale)
    norm, reference = delta_norm(delta), delta_norm(adapter)
    if not math.isfinite(norm) or norm > rules.max_update_ratio * reference:
        raise ValueError(
            f"delta norm {norm:.3g} is over strategy.max-update-ratio={rules.max_update_ratio:g} x "
            f"{reference:.3g}, the norm of the adapter sent"
        )
    return NodeUpdate(node_id=node, rank=rank, sent=adapter, delta=delta, weight=float(weight))


def cap_weight(update: NodeUpdate, max_examples: int) -> tuple[NodeUpdate, str | None]:
    """``update`` counted for at most ``max_examples`` examples, and a note when it claimed more."""
    if update.weight <= max_examples:
        return update, None
    note = (
        f"node {update.node_id} claims {update.weight:.4g} examples; it counts for "
        f"strategy.max-node-examples={max_examples}"
    )
    return replace(update, weight=float(max_examples)), note


def outliers(updates: Sequence[NodeUpdate]) -> list[tuple[int, str]]:
    """(index, reason) of each delta whose norm is over OUTLIER_FACTOR times the median (needs 3+)."""
    if len(updates) < 3:
        return []
    norms = [delta_norm(u.delta) for u in updates]
    moved = sorted(n for n in norms if n > 0)  # zero deltas must not pull the median to 0
    if len(moved) < 3:
        return []
    median = moved[len(moved) // 2]
    return [
        (i, f"delta norm {norm:.3g} is over {OUTLIER_FACTOR}x the round median {median:.3g}")
        for i, norm in enumerate(norms)
        if median > 0 and norm > OUTLIER_FACTOR * median
    ]


def delta_norm(adapter: Adapter) -> float:
    """Euclidean norm of all factors of ``adapter`` together (in float64: huge values stay finite)."""
    total = math.fsum(float(p.a.double().pow(2).sum() + p.b.double().pow(2).sum()) for p in adapter.values())
    return math.sqrt(total)


def is_finite(pair: LoraFactors) -> bool:
    """True when both factors hold finite values only."""
    return bool(torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all())


def evaluation_problem(record: MetricRecord | None, max_examples: int) -> str | None:
    """Why an evaluate reply's figures cannot be averaged (None: usable; "": it scored no example)."""
    if record is None:
        return "the reply has no metrics record"
    weight = record.get(P.NUM_EXAMPLES, 0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
        return f"num-examples={str(weight)[:40]} is not a finite number"
    if weight == 0:
        return ""
    if not 0 < weight <= max_examples:
        return f"num-examples={weight:.4g} is not within 1 to strategy.max-node-examples={max_examples}"
    loss = record.get(P.EVAL_LOSS)
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        return f"eval-loss={str(loss)[:40]} is not a finite number >= 0"
    return None


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
