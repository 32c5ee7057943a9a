"""FLoRA by stacking: the global product plus every node's update product, exactly, then re-projected.

A node's update is ``s_k (B'_k A'_k - B_k A_k)`` (trained minus received product). Stacking the global
factors with the weighted update factors (``math.flora.stack_with_updates``) gives factors whose product
is ``W_g + sum_k p_k update_k`` exactly, whatever the ranks. The stacked rank grows every round, so Pollen
re-projects the stack to the largest node rank with a truncated SVD read off QR factors of the stack (no
dense matrix); folding into the base weights instead would re-quantize every node's 4-bit base each
round and put the base on the wire. Error feedback: like FlexLoRA, nodes receive SVD-derived factors
each round, so residuals of last round's factors do not line up with the new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter
from strategies.base import LoraStrategy
from strategies.math.flora import stack_with_updates
from strategies.math.projection import balanced_factors, svd_of_product
from strategies.replies import NodeUpdate


class FloraStrategy(LoraStrategy):
    """Stack exactly, re-project to the largest node rank."""

    name = "flora"
    projection = "svd"

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        rank = next(iter(global_adapter.values())).rank
        trained = [u.trained() for u in updates]  # once per node: each rebuilds the whole adapter
        stacked = stack_with_updates(
            global_adapter, [u.sent for u in updates], trained, [u.weight for u in updates]
        )
        return {
            module: balanced_factors(svd_of_product(pair.b, pair.a, pair.scale, max_rank=rank), rank)
            for module, pair in stacked.items()
        }
