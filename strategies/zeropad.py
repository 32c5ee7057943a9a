"""HetLoRA-style zero padding: nodes train the first r_k slots of one max-rank global adapter.

Each node receives the global factors truncated to its rank (B rescaled to its ``alpha / r_k``); its
delta is zero-padded back to the global rank and averaged factor by factor, optionally weighted by
the norm of each update. Error feedback is meaningful: every slot persists across rounds.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter, LoraFactors, add
from strategies.base import LoraStrategy, NodeUpdate
from strategies.math.projection import project_to_rank
from strategies.math.zeropad import pad_a, pad_b, zeropad_aggregate


class ZeroPadLora(LoraStrategy):
    """Zero-pad to the largest rank, aggregate, truncate per node."""

    name = "zeropad"

    def project(self, global_adapter: Adapter, rank: int) -> Adapter:
        return project_to_rank(global_adapter, rank, self.settings.alpha, method="truncate")

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        mean = zeropad_aggregate(
            [u.delta for u in updates], [u.weight for u in updates], norm_weighted=self.settings.norm_weighted
        )
        return add(global_adapter, _as_global(mean, global_adapter))


def _as_global(delta: Adapter, global_adapter: Adapter) -> Adapter:
    """``delta`` zero-padded to the global rank, with B rescaled to the global scale."""
    out: Adapter = {}
    for module, pair in delta.items():
        target = global_adapter[module]
        out[module] = LoraFactors(
            a=pad_a(pair.a, target.rank),  # (global_rank, in_features)
            b=pad_b(pair.b * (pair.scale / target.scale), target.rank),  # (out_features, global_rank)
            scale=target.scale,
        )
    return out
