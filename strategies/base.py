"""The Flower strategy every Pollen strategy extends: sampling, per-node encoding, reply bookkeeping.

A strategy subclass supplies the math (``project`` and ``combine``) and two class attributes. The server
loop works in one currency, the :class:`~pollen.adapter.Adapter`: ``train_messages`` / ``aggregate`` /
``evaluate_messages`` take and return adapters. Flower's own hooks (``configure_train`` and the others,
which Flower's ``Strategy.start`` loop calls) take and return the stored form in an ``ArrayRecord`` and
delegate to them: records exist only at that boundary and inside messages.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from pollen import protocol as P
from pollen.adapter import Adapter, from_stored, to_stored
from pollen.codec import WireSpec
from pollen.downlink import View, build_payload
from strategies.math.projection import project_to_ranks
from strategies.replies import (
    REJECTED,
    NodeUpdate,
    ReplyRules,
    accept_train_reply,
    cap_weight,
    evaluation_problem,
    is_finite,
    outliers,
    weighted_metrics,
)
from strategies.sampling import sample_size, seeded_sample, wait_for_nodes

log = logging.getLogger("pollen")
# strategy-state key of the downlink encoder's generator (stochastic rounding), saved in checkpoints
GENERATOR_STATE = "downlink-generator"


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
    norm_weighted: bool = False  # zeropad: weight each node also by the norm of its trained module (HetLoRA)
    ffa_lr_multiplier: float = 1.0  # ffa: factor on the learning rate nodes train B with
    uplink: WireSpec = WireSpec(bits=32)  # the wire spec every train reply must use
    max_update_ratio: float = 25.0  # reject a delta whose norm is over this times the adapter sent
    max_node_examples: int = 1_000_000  # the most examples one update (or evaluation) counts for


@dataclass
class RoundReport:
    """What happened to the replies of the last aggregated round."""

    accepted: int = 0
    rejected: list[str] = field(default_factory=list)  # one reason per rejected reply
    accepted_nodes: list[int] = field(default_factory=list)  # senders of the accepted replies


class LoraStrategy(Strategy):
    """Base class of Pollen strategies (a Flower message-API strategy; subclasses add only math).

    ``node_ranks`` (node id -> rank) is filled by the ServerApp from each node's handshake; only nodes
    listed there are sampled. ``node_keys`` (node id -> partition id) orders nodes before the seeded
    draw: node ids are random per run, partition ids are not, so the same seed samples the same data.
    """

    name = "base"
    trains_a = True  # False: nodes keep A frozen and send only B deltas (FFA-LoRA)
    mixed_ranks = True  # False: every node must train lora.rank (the strategy cannot mix ranks)
    # How the global adapter reaches a node's rank (strategies.math.projection): "truncate", "svd", or
    # None for a strategy whose nodes all train the global rank.
    projection: str | None = "truncate"

    def __init__(self, settings: StrategySettings) -> None:
        self.settings = settings
        self.report = RoundReport()
        self.node_ranks: dict[int, int] = {}
        self.node_keys: dict[int, int] = {}
        self.partition_sizes: dict[int, int] = {}  # node id -> examples its pool partition holds
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
        return self.project_all(global_adapter, [rank])[rank]

    def project_all(self, global_adapter: Adapter, ranks: Sequence[int]) -> dict[int, Adapter]:
        """The global adapter at each of ``ranks`` (rank -> adapter), each projection computed once."""
        if self.projection is not None:
            return project_to_ranks(global_adapter, ranks, self.settings.alpha, self.projection)
        first = next(iter(global_adapter.values()))
        for rank in ranks:
            if rank != first.rank:
                raise ValueError(
                    f"{self.name} needs equal ranks; cannot send rank {rank} from rank {first.rank}"
                )
        return dict.fromkeys(ranks, global_adapter)

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        """The next global adapter from the current one and the accepted updates."""
        raise NotImplementedError

    def train_lr(self, lr: float) -> float:
        """The rate nodes train with, from the round's rate in the train config (ffa raises it)."""
        return lr

    # ---- the server loop's API: adapters in, adapters out ------------------------------------
    def train_messages(
        self, server_round: int, global_adapter: Adapter, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Sample nodes; send each the global adapter projected to its rank and encoded for the downlink."""
        self._global = global_adapter
        self._sent = {}
        self._pending_views = {}
        if P.LR in config:  # one learning rate per round; never mutate the caller's record
            config = ConfigRecord({**config, P.LR: self.train_lr(P.config_number(config, P.LR))})
        nodes = self._sample(grid, self.settings.fraction_train, server_round, salt=0)
        projected = self.project_all(global_adapter, [self.rank_of(n) for n in nodes])
        messages = []
        for node_id in nodes:
            adapter = projected[self.rank_of(node_id)]
            message, sent = self._message(node_id, adapter, config, server_round, MessageType.TRAIN)
            self._sent[node_id] = sent
            messages.append(message)
        return messages

    def aggregate(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[Adapter | None, MetricRecord | None]:
        """Validate and decode every reply, then combine the accepted deltas into the next global adapter."""
        if self._global is None:
            raise RuntimeError("aggregate called before train_messages")
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
                update = accept_train_reply(reply, self._sent, self._rules())
            except REJECTED as exc:
                self._reject(server_round, f"node {node}: {exc}")
                continue
            update, note = cap_weight(update, self.settings.max_node_examples)
            if note is not None:
                log.warning("round %d: %s", server_round, note)
            updates.append(update)
            metrics.append(reply.content.metric_records[P.METRICS])
        for index, reason in reversed(outliers(updates)):
            self._reject(server_round, f"node {updates[index].node_id}: {reason}")
            del updates[index], metrics[index]
        self.report.accepted = len(updates)
        self.report.accepted_nodes = [u.node_id for u in updates]
        if not updates:
            return None, None
        new_global = self.combine(self._global, updates)
        broken = next((m for m, p in new_global.items() if not is_finite(p)), None)
        if broken is not None:  # never produce (or checkpoint) a non-finite global adapter
            self._reject(
                server_round, f"all {len(updates)} accepted updates: the aggregate of {broken} is not finite"
            )
            self.report.accepted, self.report.accepted_nodes = 0, []
            return None, None
        return new_global, weighted_metrics(metrics, [u.weight for u in updates])

    def evaluate_messages(
        self, server_round: int, global_adapter: Adapter, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Send the global adapter (at each node's rank) to a sample of nodes for local evaluation."""
        if self.settings.fraction_evaluate <= 0.0:
            return []
        nodes = self._sample(grid, self.settings.fraction_evaluate, server_round, salt=1)
        projected = self.project_all(global_adapter, [self.rank_of(n) for n in nodes])
        kind = MessageType.EVALUATE
        return [self._message(n, projected[self.rank_of(n)], config, server_round, kind)[0] for n in nodes]

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the strategy: the downlink encoder's generator.

        Downlink views are not kept: they describe what nodes hold in this run's ``context.state``,
        which a resumed run (a new Flower run) starts without, so it sends whole adapters first.
        """
        return {GENERATOR_STATE: self._generator.get_state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state` of a checkpoint; ValueError when it lacks a key or has a bad one."""
        saved = state.get(GENERATOR_STATE)
        if not isinstance(saved, torch.Tensor) or saved.dtype != torch.uint8:
            raise ValueError(f"strategy state {GENERATOR_STATE!r} is missing or not a generator state")
        self._generator.set_state(saved)

    # ---- Flower's strategy hooks: the stored form in an ArrayRecord ---------------------------------
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
        """Flower's hook: :meth:`train_messages` for the adapter stored in ``arrays``."""
        return self.train_messages(server_round, from_stored(arrays.to_torch_state_dict()), config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's hook: :meth:`aggregate`, the new global adapter in its stored form."""
        adapter, metrics = self.aggregate(server_round, replies)
        return (None if adapter is None else ArrayRecord(to_stored(adapter))), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Flower's hook: :meth:`evaluate_messages` for the adapter stored in ``arrays``."""
        return self.evaluate_messages(server_round, from_stored(arrays.to_torch_state_dict()), config, grid)

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
            problem = evaluation_problem(record, self.settings.max_node_examples)
            if record is None or problem is not None:
                if problem:  # "" = it scored no example: nothing to count, nothing wrong
                    log.warning(
                        "round %d: left out the evaluation of node %d: %s",
                        server_round,
                        reply.metadata.src_node_id,
                        problem,
                    )
                continue
            records.append(record)
            weights.append(float(P.config_number(record, P.NUM_EXAMPLES)))
        return weighted_metrics(records, weights) if records else None

    # ---- helpers ------------------------------------------------------------------------------
    def rank_of(self, node_id: int) -> int:
        """The rank ``node_id`` trains (from its handshake; the default rank if it made none)."""
        return self.node_ranks.get(node_id, self.settings.global_rank)

    def _rules(self) -> ReplyRules:
        s = self.settings
        return ReplyRules(
            fingerprint=s.fingerprint,
            trains_a=self.trains_a,
            uplink=s.uplink,
            max_update_ratio=s.max_update_ratio,
            max_examples=s.max_node_examples,
            partition_sizes=self.partition_sizes,
        )

    def _reject(self, server_round: int, reason: str) -> None:
        self.report.rejected.append(reason)
        log.warning("round %d: rejected the update of %s", server_round, reason)

    def _sample(self, grid: Grid, fraction: float, server_round: int, salt: int) -> list[int]:
        """Wait (bounded) for min_nodes eligible nodes, then draw a seeded sample of them."""
        s = self.settings
        nodes = wait_for_nodes(lambda: self._eligible(grid), s.min_nodes, s.wait_seconds, "usable nodes")
        size = sample_size(len(nodes), fraction, s.min_nodes)
        return seeded_sample(nodes, size, s.seed, server_round, salt, self._order)

    def _order(self, node_id: int) -> tuple[int, int]:
        """Sort key of a node: its partition id when known, then its node id."""
        return (self.node_keys.get(node_id, node_id), node_id)

    def _eligible(self, grid: Grid) -> list[int]:
        connected = sorted(grid.get_node_ids(), key=self._order)
        if not self.node_ranks:  # no handshake made: every connected node trains the default rank
            return connected
        return [n for n in connected if n in self.node_ranks]

    def _message(
        self, node_id: int, adapter: Adapter, config: ConfigRecord, server_round: int, kind: str
    ) -> tuple[Message, Adapter]:
        """The message carrying ``adapter`` (the global at the node's rank), and the adapter as the node
        will decode it.

        With a quantized downlink and error feedback, a training message carries only the change since
        the adapter the node holds (its *view*); what quantization drops is still in the next change.
        """
        rank = self.rank_of(node_id)
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
