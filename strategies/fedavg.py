"""FedAvg of LoRA factor deltas at equal ranks (the FedIT baseline): global += weighted mean delta."""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter, add
from strategies.base import LoraStrategy
from strategies.math.fedavg import average_factors
from strategies.replies import NodeUpdate


class FedAvgLora(LoraStrategy):
    """Every node trains the global rank; A and B deltas are averaged separately, weighted by examples."""

    name = "fedavg"
    mixed_ranks = False
    projection = None

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        return add(global_adapter, average_factors([u.delta for u in updates], [u.weight for u in updates]))
