"""FLoRA (Wang et al., NeurIPS 2024): aggregate by stacking factors, which is exact for any ranks.

Concatenating the clients' A factors along the rank axis (each multiplied by its weight and scale) and
their B factors likewise gives one pair of rank ``sum_k r_k`` whose product is exactly the weighted sum of
the clients' products, ``sum_k p_k s_k B_k A_k``; averaging A and B separately (FedIT) is not.

The stacked rank grows with every round and every client. Pollen's strategy (strategies/flora.py)
re-projects the stack to the largest node rank with the exact low-rank SVD (:func:`reproject` does the
same for a plain stack); folding into the base weights (:func:`fold_into_dense`, small dense models
only) would re-quantize every node's 4-bit base each round. docs/STRATEGIES.md explains the choice.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.fedavg import (
    accumulation_dtype,
    check_layer_shapes,
    check_scales,
    common_modules,
    normalize_weights,
)
from strategies.math.projection import project_to_rank


def stack_factors(updates: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Stack every module's factors along the rank axis so that ``B_stack @ A_stack = sum_k p_k s_k B_k A_k``.

    ``A_stack = cat_k(p_k s_k A_k)`` (weights and scales folded into A), ``B_stack = cat_k(B_k)``, scale 1.0;
    the stacked rank is ``sum_k r_k``, in the order of ``updates``.
    """
    fractions = normalize_weights(weights, len(updates))
    stacked: Adapter = {}
    for module in common_modules(updates):
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        scales = check_scales(module, pairs)
        dtype = accumulation_dtype(pairs[0].a)
        a_stack = torch.cat(
            [
                pair.a.to(dtype) * (fraction * scale)
                for pair, fraction, scale in zip(pairs, fractions, scales, strict=True)
            ]
        )  # (sum_k r_k, in_features)
        b_stack = torch.cat([pair.b.to(dtype) for pair in pairs], dim=1)  # (out_features, sum_k r_k)
        stacked[module] = LoraFactors(a=a_stack, b=b_stack, scale=1.0)
    return stacked


def fold_into_dense(stacked: Adapter) -> dict[str, torch.Tensor]:
    """The dense update ``scale * B @ A`` of every module, to add to the base weights (small models only)."""
    dense: dict[str, torch.Tensor] = {}
    for module, pair in stacked.items():
        dtype = accumulation_dtype(pair.a)
        product = pair.scale * (pair.b.double() @ pair.a.double())  # (out_features, in_features)
        dense[module] = product.to(dtype)
    return dense


def reproject(stacked: Adapter, rank: int, alpha: float, generator: torch.Generator | None = None) -> Adapter:
    """Best rank-``rank`` pair (scale ``alpha / rank``) of every stacked product, via the low-rank SVD."""
    return project_to_rank(stacked, rank, alpha, method="svd", generator=generator)
