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
from pollen.adapter import Adapter, LoraFactors, add, flatten, unflatten
from pollen.codec import CodecError, WireSpec, decode
from pollen.downlink import View, build_payload

log = logging.getLogger("pollen")


@dataclass(frozen=True)
class StrategySettings:
    """What every strategy needs to know, built from the run config by ``server_app``."""

    fraction_train: float
    fraction_evaluate: float
    min_nodes: int
    alpha: float  # lora_alpha: a rank-r adapter has scale alpha / r
    global_rank: int  # rank of nodes that state none (lora.rank)
    fingerprint: str
    downlink: WireSpec
    seed: int
    wait_seconds: float = 600.0  # how long sampling waits for min_nodes to connect
    downlink_feedback: bool = True  # quantized downlink sends changes since the node's last adapter
    norm_weighted: bool = False  # zeropad: weight each update also by its norm (HetLoRA)
    ffa_lr_multiplier: float = 1.0  # ffa: factor on the learning rate nodes train B with


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


@dataclass
class RoundReport:
    """What happened to the replies of the last aggregated round."""

    accepted: int = 0
    rejected: list[str] = field(default_factory=list)  # one reason per rejected reply


_SCALE_SUFFIX = ".scale"


def adapter_to_record(adapter: Adapter) -> ArrayRecord:
    """The server's exact global adapter: fp32 factors plus each pair's scale (never sent to nodes)."""
    tensors = {k: v.detach().float().contiguous() for k, v in flatten(adapter).items()}
    for module, pair in adapter.items():
        tensors[module + _SCALE_SUFFIX] = torch.tensor([pair.scale], dtype=torch.float64)
    return ArrayRecord(tensors)


def adapter_from_record(record: ArrayRecord) -> Adapter:
    """Inverse of :func:`adapter_to_record`."""
    state = record.to_torch_state_dict()
    factors = {k: v for k, v in state.items() if not k.endswith(_SCALE_SUFFIX)}
    adapter = unflatten(factors, scale=1.0)
    return {
        m: LoraFactors(a=p.a, b=p.b, scale=float(state[m + _SCALE_SUFFIX].item())) for m, p in adapter.items()
    }


def sample_size(available: int, fraction: float, min_nodes: int) -> int:
    """How many of ``available`` nodes a round samples: the fraction rounded up, at least min_nodes."""
    return min(available, max(min_nodes, math.ceil(fraction * available)))


class LoraStrategy(Strategy):
    """Base class of Pollen strategies (Flower message-API strategy, hooks only).

    ``node_ranks`` (node id -> rank) is filled by the ServerApp from each node's handshake; only nodes
    listed there are sampled. ``node_keys`` (node id -> partition id) orders nodes before the seeded
    draw: node ids are random per run, partition ids are not, so the same seed samples the same data.
    """

    name = "base"
    trains_a = True  # False: nodes keep A frozen and send only B deltas (FFA-LoRA)
    mixed_ranks = True  # False: every node must train lora.rank (the strategy cannot mix ranks)

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings
        self.report = RoundReport()
        self.node_ranks: dict[int, int] = {}
        self.node_keys: dict[int, int] = {}
        self._global: Adapter | None = None
        self._sent: dict[int, Adapter] = {}  # node id -> adapter it was sent, as it decodes it
        # Downlink views: node id -> the adapter the node holds; committed when the node replies.
        self._views: dict[int, View] = {}
        self._pending_views: dict[int, View] = {}
        self._downlink_delta = settings.downlink.bits < 32 and settings.downlink_feedback
        self._generator = torch.Generator().manual_seed(settings.seed)

    # ---- math hooks ---------------------------------------------------------------------------
    def global_rank(self, ranks: Sequence[int]) -> int:
        """Rank of the global adapter for nodes of ``ranks``: the largest, or lora.rank without mixing."""
        return max([self.settings.global_rank, *ranks]) if self.mixed_ranks else self.settings.global_rank

    def initial_global(self, fresh: Adapter) -> Adapter:
        """The round-1 global adapter, from a freshly initialised one of rank ``global_rank``."""
        return fresh

    def project(self, global_adapter: Adapter, rank: int) -> Adapter:
        """The global adapter as a node of ``rank`` receives it (scale ``alpha / rank``)."""
        first = next(iter(global_adapter.values()))
        if rank != first.rank:
            raise ValueError(f"{self.name} needs equal ranks; cannot send rank {rank} from rank {first.rank}")
        return global_adapter

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        """The next global adapter from the current one and the accepted updates."""
        raise NotImplementedError

    def train_lr(self, lr: float) -> float:
        """The rate nodes train with, from the round's rate in the train config (ffa raises it)."""
        return lr

    # ---- Flower hooks -------------------------------------------------------------------------
    def summary(self) -> None:
        s = self.settings
        log.info(
            "strategy %s: fraction-train %.2f, fraction-evaluate %.2f, min nodes %d, downlink %d-bit, "
            "node ranks %s",
            self.name,
            s.fraction_train,
            s.fraction_evaluate,
            s.min_nodes,
            s.downlink.bits,
            sorted(set(self.node_ranks.values())) or [s.global_rank],
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample nodes; send each the global adapter projected to its rank and encoded for the downlink."""
        self._global = adapter_from_record(arrays)
        self._sent = {}
        self._pending_views = {}
        if P.LR in config:  # one learning rate per round; never mutate the caller's record
            config = ConfigRecord({**config, P.LR: self.train_lr(P.config_number(config, P.LR))})
        messages = []
        for node_id in self._sample(grid, self.settings.fraction_train, server_round, salt=0):
            message, sent = self._message(node_id, config, server_round, MessageType.TRAIN)
            self._sent[node_id] = sent
            messages.append(message)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and decode every reply, then combine the accepted deltas into the next global."""
        if self._global is None:
            raise RuntimeError("aggregate_train called before configure_train")
        self.report = RoundReport()
        updates: list[NodeUpdate] = []
        metrics: list[MetricRecord] = []
        # Replies arrive in any order; summing in partition order keeps a seeded run reproducible.
        for reply in sorted(replies, key=lambda r: self._order(r.metadata.src_node_id)):
            node = reply.metadata.src_node_id
            if node in self._pending_views:  # the node received (and stored) this round's adapter...
                if reply.has_error():  # ...unless it failed: start it afresh with a full adapter
                    self._views.pop(node, None)
                else:
                    self._views[node] = self._pending_views[node]
            try:
                updates.append(self._accept(reply))
            except (CodecError, KeyError, ValueError, TypeError) as exc:
                reason = f"node {node}: {exc}"
                self.report.rejected.append(reason)
                log.warning("round %d: rejected the update of %s", server_round, reason)
                continue
            metrics.append(reply.content.metric_records[P.METRICS])
        self._reject_outliers(updates, metrics, server_round)
        self.report.accepted = len(updates)
        if not updates:
            return None, None
        new_global = self.combine(self._global, updates)
        return adapter_to_record(new_global), _weighted_metrics(metrics, [u.weight for u in updates])

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global adapter (at each node's rank) to a sample of nodes for local evaluation."""
        if self.settings.fraction_evaluate <= 0.0:
            return []
        self._global = adapter_from_record(arrays)
        nodes = self._sample(grid, self.settings.fraction_evaluate, server_round, salt=1)
        return [self._message(n, config, server_round, MessageType.EVALUATE)[0] for n in nodes]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the nodes' evaluation metrics; failed replies are logged."""
        records, weights = [], []
        for reply in replies:
            if reply.has_error():
                log.warning(
                    "round %d: evaluation failed on node %d: %s",
                    server_round,
                    reply.metadata.src_node_id,
                    P.error_line(reply.error.reason),
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
    def rank_of(self, node_id: int) -> int:
        """The rank ``node_id`` trains (from its handshake; the default rank if it made none)."""
        return self.node_ranks.get(node_id, self.settings.global_rank)

    def _sample(self, grid: Grid, fraction: float, server_round: int, salt: int) -> list[int]:
        """Wait (bounded) for min_nodes eligible nodes, then draw a seeded sample of them."""
        deadline = time.monotonic() + self.settings.wait_seconds
        while len(nodes := self._eligible(grid)) < self.settings.min_nodes:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"only {len(nodes)} usable nodes connected within {self.settings.wait_seconds:.0f} s; "
                    f"strategy.min-nodes is {self.settings.min_nodes}"
                )
            time.sleep(1.0)
        size = sample_size(len(nodes), fraction, self.settings.min_nodes)
        rng = random.Random(self.settings.seed * 1_000_003 + server_round * 2 + salt)
        return sorted(rng.sample(nodes, size), key=self._order)

    def _order(self, node_id: int) -> tuple[int, int]:
        """Sort key of a node: its partition id when known, then its node id."""
        return (self.node_keys.get(node_id, node_id), node_id)

    def _eligible(self, grid: Grid) -> list[int]:
        connected = sorted(grid.get_node_ids(), key=self._order)
        if not self.node_ranks:  # no handshake made: every connected node trains the default rank
            return connected
        return [n for n in connected if n in self.node_ranks]

    def _message(
        self, node_id: int, config: ConfigRecord, server_round: int, kind: str
    ) -> tuple[Message, Adapter]:
        """The message for one node, and the adapter as the node will decode it.

        With a quantized downlink and error feedback, a training message carries only the change since
        the adapter the node holds (its *view*); what quantization drops is still in the next change.
        """
        if self._global is None:
            raise RuntimeError("no global adapter: configure_* sets it")
        rank = self.rank_of(node_id)
        adapter = self.project(self._global, rank)
        by_change = kind == MessageType.TRAIN and self._downlink_delta
        payload = build_payload(
            adapter, self._views.get(node_id), self.settings.downlink, self._generator, by_change
        )
        node_config = ConfigRecord({**config, **payload.entries})  # never mutate the caller's record
        if payload.version is not None:
            self._pending_views[node_id] = View(payload.version, payload.received)
        node_config[P.ROUND] = server_round
        node_config[P.RANK] = rank
        node_config[P.FINGERPRINT] = self.settings.fingerprint
        node_config[P.TRAIN_A] = self.trains_a
        content = RecordDict({P.ADAPTER: payload.record, P.CONFIG: node_config})
        return Message(content=content, message_type=kind, dst_node_id=node_id), payload.received

    def _accept(self, reply: Message) -> NodeUpdate:
        """Check one train reply and decode its delta; raises with the reason when it is unusable."""
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
        if meta.get(P.FINGERPRINT) != self.settings.fingerprint:
            raise ValueError(
                f"base-model fingerprint {meta.get(P.FINGERPRINT)!r} differs from the server's "
                f"{self.settings.fingerprint!r}: the node runs another base model"
            )
        sent = self._sent.get(node)
        if sent is None:
            raise ValueError("the node was not asked to train this round")
        rank = rank_of_adapter(sent)
        if meta.get(P.RANK) != rank:
            raise ValueError(f"declares rank {meta.get(P.RANK)!r}, but was sent rank {rank}")
        weight = metrics.get(P.NUM_EXAMPLES)
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"num-examples={weight!r} must be a positive number")
        scale = meta.get(P.LORA_SCALE)
        expected_scale = rank_scale(sent)
        if not isinstance(scale, float) or not math.isclose(scale, expected_scale, rel_tol=1e-6):
            raise ValueError(f"lora-scale={scale!r} differs from alpha / rank = {expected_scale}")
        tensors = decode(content.array_records[P.DELTA])
        if not self.trains_a:
            if any(name.endswith(".A") for name in tensors):
                raise ValueError("sent A factors, but this strategy keeps A frozen")
            tensors.update({m + ".A": torch.zeros_like(p.a) for m, p in sent.items()})
        delta = unflatten(tensors, scale=scale)
        if delta.keys() != sent.keys():
            raise ValueError("the delta covers other modules than the global adapter")
        for module, pair in delta.items():
            ref = sent[module]
            if pair.a.shape != ref.a.shape or pair.b.shape != ref.b.shape:
                raise ValueError(
                    f"{module}: A{tuple(pair.a.shape)} B{tuple(pair.b.shape)} do not match "
                    f"A{tuple(ref.a.shape)} B{tuple(ref.b.shape)} of rank {rank}"
                )
            if not (torch.isfinite(pair.a).all() and torch.isfinite(pair.b).all()):
                raise ValueError(f"{module}: the delta holds non-finite values")
        return NodeUpdate(node_id=node, rank=rank, sent=sent, delta=delta, weight=float(weight))

    def _reject_outliers(
        self, updates: list[NodeUpdate], metrics: list[MetricRecord], server_round: int
    ) -> None:
        """Drop deltas whose norm is over OUTLIER_FACTOR times the round's median (needs 3+ replies)."""
        if len(updates) < 3:
            return
        norms = [_norm(u.delta) for u in updates]
        median = sorted(norms)[len(norms) // 2]
        for i in reversed(range(len(updates))):
            if median > 0 and norms[i] > OUTLIER_FACTOR * median:
                reason = f"delta norm {norms[i]:.3g} is over {OUTLIER_FACTOR}x the round median {median:.3g}"
                self.report.rejected.append(reason)
                log.warning("round %d: rejected an update: %s", server_round, reason)
                del updates[i], metrics[i]


def rank_of_adapter(adapter: Adapter) -> int:
    """The rank shared by every pair of ``adapter``."""
    return next(iter(adapter.values())).rank


def rank_scale(adapter: Adapter) -> float:
    """The scale shared by every pair of ``adapter`` (a node's ``alpha / rank``)."""
    return next(iter(adapter.values())).scale


# A delta this many times larger than the round's median is treated as broken or hostile.
OUTLIER_FACTOR = 20.0


def _norm(adapter: Adapter) -> float:
    return math.sqrt(sum(float(p.a.pow(2).sum() + p.b.pow(2).sum()) for p in adapter.values()))


def _weighted_metrics(records: Sequence[MetricRecord], weights: Sequence[float]) -> MetricRecord:
    """Weighted mean of each numeric metric; ``num-examples`` is summed, peak memory is the maximum."""
    out: dict[str, int | float | list[int] | list[float]] = {}
    keys = {k for r in records for k, v in r.items() if isinstance(v, (int, float))}
    for key in sorted(keys):
        pairs: list[tuple[float, float]] = []
        for record, weight in zip(records, weights, strict=True):
            value = record.get(key)
            if isinstance(value, (int, float)):
                pairs.append((float(value), weight))
        if key == P.NUM_EXAMPLES:
            out[key] = sum(v for v, _ in pairs)
        elif key == P.PEAK_RSS_MB:
            out[key] = max(v for v, _ in pairs)
        elif key == P.NUM_PROMPT_CUT:
            out[key] = sum(v for v, _ in pairs)
        else:
            out[key] = sum(v * w for v, w in pairs) / max(sum(w for _, w in pairs), 1e-12)
    return MetricRecord(out)
