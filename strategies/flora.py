"""FLoRA by stacking: the global product plus every node's update product, exactly, then re-projected.

A node's update is ``s_k (B'_k A'_k - B_k A_k)`` (trained minus received product). Stacking the global
factors with the weighted update factors, ``[B_g, B'_1, -B_1, ...]`` times
``[s_g A_g; p_1 s_1 A'_1; p_1 s_1 A_1; ...]``, equals ``W_g + sum_k p_k update_k`` exactly, whatever
the ranks. The stacked rank grows every round, so Pollen re-projects the stack to the largest node
rank with a truncated SVD read off QR factors of the stack (no dense matrix); folding into the base
weights instead would re-quantize every node's 4-bit base each round and put the base on the wire.
Error feedback: like FlexLoRA, nodes receive SVD-derived factors each round, so residuals of last
round's factors do not line up with the new ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.base import LoraStrategy, NodeUpdate
from strategies.math.fedavg import normalize_weights
from strategies.math.projection import project_to_rank, svd_of_product
from strategies.math.zeropad import pad_a, pad_b


def stack_with_updates(global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
    """Factors whose product is ``W_g + sum_k p_k s_k (B'_k A'_k - B_k A_k)``; scale 1.0."""
    fractions = normalize_weights([u.weight for u in updates], len(updates))
    stacked: Adapter = {}
    for module, pair in global_adapter.items():
        a_parts = [pair.a.double() * pair.scale]  # (r_g, in)
        b_parts = [pair.b.double()]  # (out, r_g)
        for update, fraction in zip(updates, fractions, strict=True):
            sent, trained = update.sent[module], update.trained()[module]
            weight = fraction * sent.scale
            a_parts += [trained.a.double() * weight, sent.a.double() * weight]  # 2 x (r_k, in)
            b_parts += [trained.b.double(), -sent.b.double()]  # 2 x (out, r_k)
        stacked[module] = LoraFactors(a=torch.cat(a_parts), b=torch.cat(b_parts, dim=1), scale=1.0)
    return stacked


class FloraStrategy(LoraStrategy):
    """Stack exactly, re-project to the largest node rank."""

    name = "flora"

    def project(self, global_adapter: Adapter, rank: int) -> Adapter:
        return project_to_rank(global_adapter, rank, self.settings.alpha, method="svd")

    def combine(self, global_adapter: Adapter, updates: Sequence[NodeUpdate]) -> Adapter:
        rank = next(iter(global_adapter.values())).rank
        out: Adapter = {}
        for module, pair in stack_with_updates(global_adapter, updates).items():
            svd = svd_of_product(pair.b, pair.a, pair.scale, max_rank=rank)
            root = svd.s.clamp_min(0).sqrt()  # (R,)
            out[module] = LoraFactors(
                a=pad_a((root[:, None] * svd.vh).float(), rank),  # (rank, in_features)
                b=pad_b((svd.u * root[None, :]).float(), rank),  # (out_features, rank)
                scale=1.0,
            )
        return out
