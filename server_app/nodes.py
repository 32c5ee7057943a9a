"""The node handshake: ask each connected node its rank, partition and base model before it trains.

A node's rank is, in order: its own ``lora-rank`` node config, else ``strategy.rank-plan`` cycled by
partition id, else ``lora.rank``. Nodes whose base model differs (fingerprint) are left out, logged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from pollen import protocol as P

log = logging.getLogger("pollen")


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


def parse_info(node_id: int, reply: Message) -> NodeInfo:
    """A handshake reply as NodeInfo; ValueError when it is malformed or an error."""
    if reply.has_error():
        raise ValueError(f"handshake failed: {P.error_line(reply.error.reason)}")
    meta = reply.content.config_records.get(P.META)
    if meta is None:
        raise ValueError("handshake reply has no meta record")
    try:
        return NodeInfo(
            node_id=node_id,
            partition_id=int(meta[P.PARTITION_ID]),  # type: ignore[arg-type]
            requested_rank=int(meta[P.RANK]),  # type: ignore[arg-type]
            fingerprint=str(meta[P.FINGERPRINT]),
            quantization=str(meta[P.QUANTIZATION]),
            device=str(meta[P.DEVICE]),
            num_partitions=int(meta.get(P.NUM_PARTITIONS, 1)),  # type: ignore[arg-type]
            own_data=bool(meta.get(P.OWN_DATA, False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"handshake reply is malformed: {exc}") from exc


@dataclass
class NodeDirectory:
    """Nodes seen so far: their ranks (eligible) or why they were left out."""

    fingerprint: str
    rank_plan: tuple[int, ...]
    default_rank: int
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
                info = parse_info(node_id, reply)
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
