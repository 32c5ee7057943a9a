"""The node handshake: ask each connected node its rank, partition and base model before it trains.

A node's rank is, in order: its own ``lora-rank`` node config, else ``strategy.rank-plan`` cycled by
partition id, else ``lora.rank``. Nodes whose base model differs (fingerprint) are left out, logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P

log = logging.getLogger("pollen")
MAX_PARTITIONS = 1_000_000  # a partition id or count beyond this is not a real federation


@dataclass(frozen=True)
class NodeInfo:
    node_id: int
    partition_id: int
    requested_rank: int  # 0 = the server decides
    fingerprint: str
    quantization: str
    device: str
    num_partitions: int = 1  # the partition id is one of this many
    own_data: bool = False  # the node trains on its own data-path, not on a partition of the pool


def assign_rank(info: NodeInfo, rank_plan: Sequence[int], default_rank: int) -> int:
    """The rank a node trains: its own request, else the plan by partition id, else the default."""
    if info.requested_rank > 0:
        return info.requested_rank
    if rank_plan:
        return rank_plan[info.partition_id % len(rank_plan)]
    return default_rank


def _whole(meta: Any, key: str, low: int, high: int) -> int:
    """``meta[key]`` as an integer from ``low`` to ``high``; ValueError naming the key otherwise.

    Only a real integer passes: a string "16" or a float 8.7 (which ``int()`` would turn into 8) is refused.
    """
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"handshake {key}={str(value)[:40]} is not an integer from {low} to {high}")
    return value


def parse_info(node_id: int, reply: Message, max_rank: int = 4096) -> NodeInfo:
    """A handshake reply as NodeInfo; ValueError when it is malformed, an error, or out of bounds.

    A node's rank sets how much the server allocates, so it must be at most ``max_rank``
    (strategy.max-rank); 0 asks the server to choose.
    """
    if reply.has_error():
        raise ValueError(f"handshake failed: {P.error_line(reply.error.reason)}")
    meta = reply.content.config_records.get(P.META)
    if meta is None:
        raise ValueError("handshake reply has no meta record")
    try:
        num_partitions = _whole(meta, P.NUM_PARTITIONS, 1, MAX_PARTITIONS) if P.NUM_PARTITIONS in meta else 1
        return NodeInfo(
            node_id=node_id,
            partition_id=_whole(meta, P.PARTITION_ID, 0, MAX_PARTITIONS - 1),
            requested_rank=_whole(meta, P.RANK, 0, max_rank),
            fingerprint=str(meta[P.FINGERPRINT])[:200],
            quantization=str(meta[P.QUANTIZATION])[:40],
            device=str(meta[P.DEVICE])[:40],
            num_partitions=num_partitions,
            own_data=meta.get(P.OWN_DATA, False) is True,
        )
    except KeyError as exc:
        raise ValueError(f"handshake reply is malformed: it has no {exc}") from exc


@dataclass
class NodeDirectory:
    """Nodes seen so far: their ranks (eligible) or why they were left out."""

    fingerprint: str
    rank_plan: tuple[int, ...]
    default_rank: int
    max_rank: int = 4096  # strategy.max-rank: a handshake asking for more is refused
    ranks: dict[int, int] = field(default_factory=dict)
    infos: dict[int, NodeInfo] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)

    def discover(self, grid: Grid, timeout: float) -> list[int]:
        """Handshake with every connected node not seen before; returns the node ids newly admitted."""
        new = [n for n in sorted(grid.get_node_ids()) if n not in self.ranks and n not in self.refused]
        if not new:
            return []
        messages = [
            Message(
                content=RecordDict({P.CONFIG: ConfigRecord({})}),
                message_type=MessageType.QUERY,
                dst_node_id=n,
            )
            for n in new
        ]
        admitted = []
        answered = set()
        for reply in grid.send_and_receive(messages, timeout=timeout):
            node_id = reply.metadata.src_node_id
            answered.add(node_id)
            try:
                info = parse_info(node_id, reply, self.max_rank)
            except ValueError as exc:
                self._refuse(node_id, str(exc))
                continue
            if info.fingerprint != self.fingerprint:
                self._refuse(
                    node_id,
                    f"base-model fingerprint {info.fingerprint} differs from the server's {self.fingerprint}",
                )
                continue
            self.infos[node_id] = info
            self.ranks[node_id] = assign_rank(info, self.rank_plan, self.default_rank)
            admitted.append(node_id)
            log.info(
                "node %d joined: partition %d, rank %d, %s on %s",
                node_id,
                info.partition_id,
                self.ranks[node_id],
                info.quantization,
                info.device,
            )
        for node_id in set(new) - answered:
            log.warning("node %d did not answer the handshake; it will be asked again next round", node_id)
        return admitted

    def partition_counts(self) -> list[int]:
        """The partition counts that admitted nodes without their own data report (normally one value)."""
        return sorted({info.num_partitions for info in self.infos.values() if not info.own_data})

    def _refuse(self, node_id: int, reason: str) -> None:
        self.refused[node_id] = reason
        log.warning("node %d left out: %s", node_id, reason)
