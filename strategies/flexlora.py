"""FlexLoRA: the weighted sum of the nodes' trained products, truncated by SVD to each node's rank.

The global is kept as the leading singular directions of ``W = sum_k p_k s_k B_k A_k`` (up to the
largest node rank), computed from QR factorisations of the stacked factors, never a dense matrix.
Each node receives the best rank-r_k approximation of W. Error feedback: the factors a node receives
are re-derived from an SVD every round, so a residual from last round's factors no longer lines up;
the client keeps it only while its rank and the modules match (see docs/STRATEGIES.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter, LoraFactors
from strategies.base import LoraStrategy, NodeUpdate
from strategies.math.flexlora import lowrank_svd
from strategies.math.projection import project_to_rank
from strategies.math.zeropad import pad_a, pad_b


class FlexLoraStrategy(LoraStrategy):
    """Aggregate products, redistribute truncated SVDs."""

    name = "flexlora"

    def project(self, global_adapter: Adapter, rank: int) -> Adapter:
        return project_to_rank(global_adapter, rank, self.settings.alpha, method="svd")

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        rank = next(iter(global_adapter.values())).rank
        svd = lowrank_svd([u.trained() for u in updates], [u.weight for u in updates], max_rank=rank)
        out: Adapter = {}
        for module, factors in svd.items():
            root = factors.s.clamp_min(0).sqrt()  # (R,)
            # A layer narrower than the rank has fewer singular directions: zero slots keep one rank.
            out[module] = LoraFactors(
                a=pad_a((root[:, None] * factors.vh).float(), rank),  # (rank, in_features)
                b=pad_b((factors.u * root[None, :]).float(), rank),  # (out_features, rank)
                scale=1.0,
            )
        return out
