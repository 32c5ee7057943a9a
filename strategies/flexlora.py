"""FlexLoRA: the weighted sum of the nodes' trained products, truncated by SVD to each node's rank.

The global is kept as the leading singular directions of ``W = sum_k p_k s_k B_k A_k`` (up to the
largest node rank), computed from QR factorisations of the stacked factors, never a dense matrix.
Each node receives the best rank-r_k approximation of W. Error feedback: the factors a node receives
are re-derived from an SVD every round, so a residual from last round's factors no longer lines up;
the client keeps it only while its rank and the modules match (see docs/STRATEGIES.md).
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter
from strategies.base import LoraStrategy
from strategies.math.flexlora import lowrank_svd
from strategies.math.projection import balanced_factors
from strategies.replies import NodeUpdate


class FlexLoraStrategy(LoraStrategy):
    """Aggregate products, redistribute truncated SVDs."""

    name = "flexlora"
    projection = "svd"

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        rank = next(iter(global_adapter.values())).rank
        svds = lowrank_svd([u.trained() for u in updates], [u.weight for u in updates], max_rank=rank)
        # A layer narrower than the rank has fewer singular directions: zero slots keep one rank.
        return {module: balanced_factors(svd, rank) for module, svd in svds.items()}
