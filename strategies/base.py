"""Flower glue shared by every Pollen strategy: sampling, per-node encoding, reply validation.

A strategy subclass supplies two pieces of math (``project`` and ``combine``); this class turns the
global adapter into one encoded message per node and turns valid replies back into factor deltas.
A reply that fails validation is logged and left out; the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen import protocol as P
from pollen.adapter import Adapter, flatten, unflatten
from pollen.codec import CodecError, WireSpec, decode, encode

log = logging.getLogger("pollen")


@dataclass(frozen=True)
class StrategySettings:
    """What every strategy needs to know, built from the run config by ``server_app``."""

    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    alpha: float  # lora_alpha: a rank-r adapter has scale alpha / r
    global_rank: int
    fingerprint: str
    downlink: WireSpec
    seed: int
    wait_seconds: float = 600.0  # how long sampling waits for min_nodes to connect


@dataclass
class RoundReport:
    """What happened to the replies of the last aggregated round."""

    accepted: int = 0
    rejected: list[str] = field(default_factory=list)  # one reason per rejected reply


def adapter_to_record(adapter: Adapter) -> ArrayRecord:
    """The server's exact global adapter as an fp32 ArrayRecord (factors ``<module>.A``/``.B``)."""
    return ArrayRecord({k: v.detach().float().contiguous() for k, v in flatten(adapter).items()})


def adapter_from_record(record: ArrayRecord, scale: float) -> Adapter:
    """Inverse of :func:`adapter_to_record`."""
    return unflatten(record.to_torch_state_dict(), scale=scale)


class LoraStrategy(Strategy):
    """Base class of Pollen strategies (Flower message-API strategy, hooks only)."""

    name = "base"

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings
        self.report = RoundReport()
        self._global: Adapter | None = None
        self._sent_rank: dict[int, int] = {}  # node id -> rank it was sent this round
        self._generator = torch.Generator().manual_seed(settings.seed)

    # ---- math hooks ---------------------------------------------------------------------------
    def node_rank(self, node_id: int) -> int:
        """The rank a node trains; equal-rank strategies use the global rank."""
        return self.settings.global_rank

    def project(self, global_adapter: Adapter, rank: int) -> Adapter:
        """The global adapter as a node of ``rank`` receives it."""
        if rank != global_adapter[next(iter(global_adapter))].rank:
            raise ValueError(f"{self.name} needs equal ranks; cannot send rank {rank}")
        return global_adapter

    def combine(
        self, global_adapter: Adapter, deltas: Sequence[Adapter], weights: Sequence[float]
    ) -> Adapter:
        """The next global adapter from the current one and the nodes' deltas."""
        raise NotImplementedError

    # ---- Flower hooks -------------------------------------------------------------------------
    def summary(self) -> None:
        s = self.settings
        log.info(
            "strategy %s: fraction-train %.2f, fraction-evaluate %.2f, min nodes %d, global rank %d, "
            "downlink %d-bit",
            self.name,
            s.fraction_train,
            s.fraction_evaluate,
            s.min_nodes,
            s.global_rank,
            s.downlink.bits,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send each the global adapter projected to its rank and encoded for the downlink."""
        self._global = adapter_from_record(arrays, scale=self.settings.alpha / self.settings.global_rank)
        nodes = self._sample(grid, self.settings.fraction_train, server_round, salt=0)
        self._sent_rank = {}
        messages = []
        for node_id in nodes:
            rank = self.node_rank(node_id)
            self._sent_rank[node_id] = rank
            messages.append(self._message(node_id, rank, config, server_round, MessageType.TRAIN))
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and decode every reply, then combine the accepted deltas into the next global."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.report = RoundReport()
        deltas: list[Adapter] = []
        weights: list[float] = []
        metrics: list[MetricRecord] = []
        for reply in replies:
            try:
                delta, weight = self._accept(reply)
            except (CodecError, KeyError, ValueError, TypeError) as exc:
                node = reply.metadata.src_node_id
                reason = f"node {node}: {exc}"
                self.report.rejected.append(reason)
                log.warning("round %d: rejected the update of %s", server_round, reason)
                continue
            deltas.append(delta)
            weights.append(weight)
            metrics.append(reply.content[P.METRICS])
        self._reject_outliers(deltas, weights, metrics, server_round)
        self.report.accepted = len(deltas)
        if not deltas:
            return None, None
        new_global = self.combine(self._global, deltas, weights)
        return adapter_to_record(new_global), _weighted_metrics(metrics, weights)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter (at each node's rank) to a sample of nodes for local evaluation."""
        if self.settings.fraction_evaluate <= 0.0:
            return []
        self._global = adapter_from_record(arrays, scale=self.settings.alpha / self.settings.global_rank)
        nodes = self._sample(grid, self.settings.fraction_evaluate, server_round, salt=1)
        return [
            self._message(n, self.node_rank(n), config, server_round, MessageType.EVALUATE) for n in nodes
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the nodes' evaluation metrics; failed replies are logged."""
        records, weights = [], []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )
                continue
            record = reply.content.metric_records.get(P.METRICS)
            weight = record.get(P.NUM_EXAMPLES, 0) if record is not None else 0
            if record is None or not isinstance(weight, (int, float)) or weight <= 0:
                continue
            records.append(record)
            weights.append(float(weight))
        return _weighted_metrics(records, weights) if records else None

    # ---- helpers ------------------------------------------------------------------------------
    def _sample(self, grid: Grid, fraction: float, server_round: int, salt: int) -> list[int]:
        """Wait (bounded) for min_nodes to connect, then draw a seeded sample of them."""
        deadline = time.monotonic() + self.settings.wait_seconds
        while len(nodes := sorted(grid.get_node_ids())) < self.settings.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} nodes connected within {self.settings.wait_seconds:.0f} s; "
                    f"strategy.min-nodes is {self.settings.min_nodes}"
                )
            time.sleep(1.0)
        size = min(len(nodes), max(self.settings.min_nodes, math.ceil(fraction * len(nodes))))
        rng = random.Random(self.settings.seed * 1_000_003 + server_round * 2 + salt)
        return sorted(rng.sample(nodes, size))

    def _message(
        self, node_id: int, rank: int, config: ConfigRecord, server_round: int, kind: str
    ) -> Message:
        assert self._global is not None  # set by configure_*; internal invariant, not user input
        adapter = self.project(self._global, rank)
        record = encode(flatten(adapter), self.settings.downlink, self._generator)
        node_config = ConfigRecord(dict(config))  # never mutate the caller's record
        node_config[P.ROUND] = server_round
        node_config[P.RANK] = rank
        node_config[P.LORA_ALPHA] = self.settings.alpha
        node_config[P.FINGERPRINT] = self.settings.fingerprint
        content = RecordDict({P.ADAPTER: record, P.CONFIG: node_config})
        return Message(content=content, message_type=kind, dst_node_id=node_id)

    def _accept(self, reply: Message) -> tuple[Adapter, float]:
        """Check one train reply and decode its delta; raises with the reason when it is unusable."""
        if reply.has_error():
            raise ValueError(f"the node reported an error: {reply.error.reason}")
        node = reply.metadata.src_node_id
        content = reply.content
        for name, records in (
            (P.DELTA, content.array_records),
            (P.METRICS, content.metric_records),
            (P.META, content.config_records),
        ):
            if name not in records:
                raise KeyError(f"reply has no {name!r} record")
        meta, metrics = content[P.META], content[P.METRICS]
        if meta.get(P.FINGERPRINT) != self.settings.fingerprint:
            raise ValueError(
                f"base-model fingerprint {meta.get(P.FINGERPRINT)!r} differs from the server's "
                f"{self.settings.fingerprint!r}: the node runs another base model"
            )
        expected_rank = self._sent_rank.get(node)
        if expected_rank is None:
            raise ValueError("the node was not asked to train this round")
        if meta.get(P.RANK) != expected_rank:
            raise ValueError(f"declares rank {meta.get(P.RANK)!r}, but was sent rank {expected_rank}")
        weight = metrics.get(P.NUM_EXAMPLES)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"num-examples={weight!r} must be a positive number")
        scale = meta.get(P.LORA_SCALE)
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"lora-scale={scale!r} must be a positive number")
        delta = unflatten(decode(content[P.DELTA]), scale=scale)
        assert self._global is not None
        reference = self.project(self._global, expected_rank)
        if delta.keys() != reference.keys():
            raise ValueError("the delta covers other modules than the global adapter")
        for module, pair in delta.items():
            ref = reference[module]
            if pair.a.shape != ref.a.shape or pair.b.shape != ref.b.shape:
                raise ValueError(
                    f"{module}: A{tuple(pair.a.shape)} B{tuple(pair.b.shape)} do not match "
                    f"A{tuple(ref.a.shape)} B{tuple(ref.b.shape)} of rank {expected_rank}"
                )
            if not (torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()):
                raise ValueError(f"{module}: the delta holds non-finite values")
        return delta, float(weight)

    def _reject_outliers(
        self, deltas: list[Adapter], weights: list[float], metrics: list[MetricRecord], server_round: int
    ) -> None:
        """Drop deltas whose norm is over OUTLIER_FACTOR times the round's median (needs 3+ replies)."""
        if len(deltas) < 3:
            return
        norms = [_norm(d) for d in deltas]
        median = sorted(norms)[len(norms) // 2]
        for i in reversed(range(len(deltas))):
            if median > 0 and norms[i] > OUTLIER_FACTOR * median:
                reason = f"delta norm {norms[i]:.3g} is over {OUTLIER_FACTOR}x the round median {median:.3g}"
                self.report.rejected.append(reason)
                log.warning("round %d: rejected an update: %s", server_round, reason)
                del deltas[i], weights[i], metrics[i]


# A delta this many times larger than the round's median is treated as broken or hostile.
OUTLIER_FACTOR = 20.0


def _norm(adapter: Adapter) -> float:
    return math.sqrt(sum(float(p.a.pow(2).sum() + p.b.pow(2).sum()) for p in adapter.values()))


def _weighted_metrics(records: Sequence[MetricRecord], weights: Sequence[float]) -> MetricRecord:
    """Weighted mean of each numeric metric; ``num-examples`` is summed."""
    out: dict[str, float] = {}
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    for key in sorted(keys):
        pairs = [
            (float(r[key]), w)
            for r, w in zip(records, weights, strict=True)
            if isinstance(r.get(key), (int, float))
        ]
        if key == P.NUM_EXAMPLES:
            out[key] = sum(v for v, _ in pairs)
        else:
            out[key] = sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1e-12)
    return MetricRecord(out)
