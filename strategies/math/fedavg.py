"""FedIT baseline: average the A factors and the B factors of equal-rank adapters separately.

Also home of the helpers every aggregation method shares: turning client weights (e.g. numbers of
examples) into validated fractions, and checking that all updates cover the same modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors

# Two scales count as equal when they agree to this relative tolerance (alpha / rank in float).
SCALE_RTOL = 1e-6


def normalize_weights(weights: Sequence[float], num_updates: int) -> list[float]:
    """Turn raw client weights (e.g. numbers of examples) into fractions that sum to one.

    Raises ValueError for a count that does not match the updates, and for negative, NaN, infinite
    or all-zero weights, because any of those would silently produce a meaningless average.
    """
    if num_updates == 0:
        raise ValueError("cannot aggregate zero updates: at least one client must reply")
    values = [float(w) for w in weights]
    if len(values) != num_updates:
        raise ValueError(
            f"got {len(values)} weights for {num_updates} updates; pass exactly one weight per update"
        )
    bad = [(i, w) for i, w in enumerate(values) if not math.isfinite(w) or w < 0.0]
    if bad:
        raise ValueError(
            f"client weights must be finite and non-negative; got {bad[:3]} as (index, weight). "
            "Use the number of training examples, or 1.0 for an unweighted mean."
        )
    total = math.fsum(values)
    if total <= 0.0:
        raise ValueError(f"client weights sum to {total}; at least one update must have a positive weight")
    return [w / total for w in values]


def common_modules(updates: Sequence[Adapter]) -> list[str]:
    """Module names shared by every update, in the first update's order; ValueError if the sets differ."""
    if not updates:
        raise ValueError("cannot aggregate zero updates: at least one client must reply")
    names = list(updates[0])
    expected = set(names)
    for index, update in enumerate(updates[1:], start=1):
        if set(update) != expected:
            missing = sorted(expected - set(update))[:3]
            extra = sorted(set(update) - expected)[:3]
            raise ValueError(
                f"update {index} covers different modules than update 0 (missing {missing}, extra {extra}); "
                "all clients must adapt the same target modules"
            )
    return names


def check_layer_shapes(module: str, pairs: Sequence[LoraFactors]) -> tuple[int, int]:
    """Return ``(out_features, in_features)`` shared by all pairs of one module; ValueError otherwise."""
    out_features, in_features = pairs[0].b.shape[0], pairs[0].a.shape[1]
    for index, pair in enumerate(pairs):
        if pair.b.shape[0] != out_features or pair.a.shape[1] != in_features:
            raise ValueError(
                f"module {module!r}: update {index} adapts a {pair.b.shape[0]}x{pair.a.shape[1]} layer "
                f"but update 0 a {out_features}x{in_features} layer; clients must share the base model"
            )
    return int(out_features), int(in_features)


def check_scales(module: str, pairs: Sequence[LoraFactors]) -> list[float]:
    """The scales of one module's pairs; ValueError unless each is finite and positive (alpha / rank)."""
    return check_scale_values(module, [pair.scale for pair in pairs])


def check_scale_values(module: str, values: Sequence[float]) -> list[float]:
    """``values`` as floats; ValueError unless each is finite and positive, as ``lora_alpha / rank`` is."""
    scales = [float(value) for value in values]
    bad = [(i, s) for i, s in enumerate(scales) if not math.isfinite(s) or s <= 0.0]
    if bad:
        raise ValueError(
            f"module {module!r}: LoRA scales must be finite and positive (lora_alpha / rank); "
            f"got {bad[:3]} as (update index, scale)"
        )
    return scales


def weighted_sum(tensors: Sequence[torch.Tensor], fractions: Sequence[float]) -> torch.Tensor:
    """``sum_k fractions[k] * tensors[k]`` for same-shape tensors, accumulated in float32 or wider."""
    total = tensors[0].to(accumulation_dtype(tensors[0])) * fractions[0]
    for tensor, fraction in zip(tensors[1:], fractions[1:], strict=True):
        total.add_(tensor, alpha=fraction)
    return total


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64: sums never run in 16-bit floats."""
    return torch.promote_types(tensor.dtype, torch.float32)


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
