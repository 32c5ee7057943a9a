"""FedIT baseline: average the A factors and the B factors of equal-rank adapters separately."""

from __future__ import annotations

import math
from collections.abc import Sequence

from pollen.adapter import Adapter, LoraFactors
from strategies.math.common import (
    SCALE_RTOL,
    check_layer_shapes,
    check_scales,
    common_modules,
    normalize_weights,
    weighted_sum,
)


def average_factors(updates: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Weighted mean of the A factors and, separately, of the B factors (FedIT).

    All updates must have the same rank and scale per module. Note that this averages factors, not
    updates: ``mean(B) @ mean(A) != mean(B @ A)`` in general, which is the known bias of FedIT that the
    other methods (stacking, SVD) remove.
    """
    fractions = normalize_weights(weights, len(updates))
    averaged: Adapter = {}
    for module in common_modules(updates):
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        ranks = [pair.rank for pair in pairs]
        if len(set(ranks)) != 1:
            raise ValueError(
                f"module {module!r}: FedAvg needs equal ranks but the updates have ranks {ranks}; "
                "use zero-padding, stacking (FLoRA) or SVD (FlexLoRA) for heterogeneous ranks"
            )
        scales = check_scales(module, pairs)
        if any(not math.isclose(s, scales[0], rel_tol=SCALE_RTOL) for s in scales):
            raise ValueError(
                f"module {module!r}: FedAvg needs equal scales (lora_alpha / rank) but the updates of rank "
                f"{ranks[0]} have scales {scales}; give every client the same lora_alpha"
            )
        averaged[module] = LoraFactors(
            a=weighted_sum([pair.a for pair in pairs], fractions),  # (rank, in_features)
            b=weighted_sum([pair.b for pair in pairs], fractions),  # (out_features, rank)
            scale=scales[0],
        )
    return averaged
