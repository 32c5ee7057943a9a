"""HetLoRA-style zero-padding: pad every client's factors to the largest rank, then average them.

Rank ``r_k`` factors are embedded in the top-left corner of rank ``R = max_k r_k`` factors (extra A rows
and extra B columns are zero), so ranks can differ. Like FedAvg it averages A and B separately, so the
product of the result is *not* the weighted sum of the clients' products unless there is one client.

Scale rule: the output keeps the scale of the first update with the largest rank (``s_out``), and each
client's B is multiplied by ``s_k / s_out`` before averaging, so every client's own product
``s_k B_k A_k`` is represented exactly at the output scale; no lora_alpha is assumed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.fedavg import (
    check_layer_shapes,
    check_scales,
    common_modules,
    normalize_weights,
    weighted_sum,
)


def product_norm(pair: LoraFactors) -> float:
    """Frobenius norm of ``scale * B @ A`` without forming it: ``||BA||_F^2 = trace((B^T B)(A A^T))``."""
    b = pair.b.double()
    a = pair.a.double()
    b_gram = b.T @ b  # (rank, rank)
    a_gram = a @ a.T  # (rank, rank)
    # trace(X @ Y) for symmetric X, Y is the sum of their elementwise product.
    squared = float((b_gram * a_gram).sum())
    return abs(float(pair.scale)) * math.sqrt(max(squared, 0.0))


def pad_a(a: torch.Tensor, rank: int) -> torch.Tensor:
    """A (r, in) -> (rank, in) with zero rows appended."""
    padded = a.new_zeros((rank, a.shape[1]))  # (rank, in_features)
    padded[: a.shape[0]] = a
    return padded


def pad_b(b: torch.Tensor, rank: int) -> torch.Tensor:
    """B (out, r) -> (out, rank) with zero columns appended."""
    padded = b.new_zeros((b.shape[0], rank))  # (out_features, rank)
    padded[:, : b.shape[1]] = b
    return padded


def _norm_weighted_fractions(pairs: Sequence[LoraFactors], fractions: Sequence[float]) -> list[float]:
    """Multiply each fraction by the norm of that client's update and renormalise (HetLoRA)."""
    scaled = [fraction * product_norm(pair) for fraction, pair in zip(fractions, pairs, strict=True)]
    total = math.fsum(scaled)
    if total <= 0.0 or not math.isfinite(total):
        # Every weighted update is zero (e.g. untrained B): fall back to the plain weights.
        return list(fractions)
    return [value / total for value in scaled]


def zeropad_aggregate(
    updates: Sequence[Adapter], weights: Sequence[float], norm_weighted: bool = False
) -> Adapter:
    """Zero-pad every module's factors to the largest rank and average A and B separately.

    With ``norm_weighted`` each client's weight is also multiplied by the Frobenius norm of its product
    ``s_k B_k A_k`` (per module), so larger updates count more, as in HetLoRA.
    """
    fractions = normalize_weights(weights, len(updates))
    aggregated: Adapter = {}
    for module in common_modules(updates):
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        scales = check_scales(module, pairs)
        ranks = [pair.rank for pair in pairs]
        max_rank = max(ranks)
        out_scale = scales[ranks.index(max_rank)]
        module_fractions = _norm_weighted_fractions(pairs, fractions) if norm_weighted else fractions
        padded_a = [pad_a(pair.a, max_rank) for pair in pairs]  # each (max_rank, in_features)
        # Fold s_k / s_out into B so that s_out * B_padded @ A_padded == s_k * B_k @ A_k for each client.
        padded_b = [
            pad_b(pair.b * (scale / out_scale), max_rank) for pair, scale in zip(pairs, scales, strict=True)
        ]
        aggregated[module] = LoraFactors(
            a=weighted_sum(padded_a, module_fractions),  # (max_rank, in_features)
            b=weighted_sum(padded_b, module_fractions),  # (out_features, max_rank)
            scale=out_scale,
        )
    return aggregated


def truncate(adapter: Adapter, rank: int) -> Adapter:
    """Keep the first ``rank`` rows of every A and columns of every B, with the scale unchanged.

    The scale stays the per-element multiplier, so the result's product is exactly the sum of the first
    ``rank`` rank-one terms ``scale * b_i a_i``. To hand a node factors at its own ``lora_alpha / rank``
    scale (and to pad to a larger rank) use ``projection.project_to_rank(..., method="truncate")``.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    truncated: Adapter = {}
    for module, pair in adapter.items():
        if rank > pair.rank:
            raise ValueError(
                f"module {module!r} has rank {pair.rank}, cannot truncate to the larger rank {rank}; "
                "use projection.project_to_rank to pad"
            )
        truncated[module] = LoraFactors(
            a=pair.a[:rank].clone(),  # (rank, in_features)
            b=pair.b[:, :rank].clone(),  # (out_features, rank)
            scale=pair.scale,
        )
    return truncated
