"""Primitives every aggregation method shares: weight and shape checks, sums, padding, stacking.

Method modules (``fedavg``, ``zeropad``, ``flora``, ``flexlora``, ``ffa``) import from here and from
``projection`` only, never from each other. Nothing here assumes an alpha or a rank: every pair carries
its own scale (``lora_alpha / rank``).
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


def accumulation_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64: sums never run in 16-bit floats."""
    return torch.promote_types(tensor.dtype, torch.float32)


def weighted_sum(tensors: Sequence[torch.Tensor], fractions: Sequence[float]) -> torch.Tensor:
    """``sum_k fractions[k] * tensors[k]`` for same-shape tensors, accumulated in float32 or wider."""
    total = tensors[0].to(accumulation_dtype(tensors[0])) * fractions[0]
    for tensor, fraction in zip(tensors[1:], fractions[1:], strict=True):
        total.add_(tensor, alpha=fraction)
    return total


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


def pad_pair(pair: LoraFactors, rank: int, scale: float) -> LoraFactors:
    """``pair`` zero-padded to ``rank`` slots at ``scale``, B times ``pair.scale / scale``: same product.

    Used to add an aggregated delta to a global adapter of a larger rank or another scale.
    """
    return LoraFactors(
        a=pad_a(pair.a, rank),  # (rank, in_features)
        b=pad_b(pair.b * (pair.scale / scale), rank),  # (out_features, rank)
        scale=scale,
    )


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


def lora_a_init_bound(in_features: int) -> float:
    """Bound of PEFT's LoRA-A init, ``kaiming_uniform_(a=sqrt(5))``: ``U(-1/sqrt(in), 1/sqrt(in))``."""
    return 1.0 / math.sqrt(in_features)


def stack_products(pairs: Sequence[LoraFactors], weights: Sequence[float], dtype: torch.dtype) -> LoraFactors:
    """One pair of scale 1.0 whose product is exactly ``sum_k weights[k] * s_k B_k A_k``, for any ranks.

    ``A = cat_k(weights[k] s_k A_k)`` (weight and scale folded into A) and ``B = cat_k(B_k)``, along the
    rank axis, in ``dtype``; the rank is ``sum_k r_k``. ``weights`` are used as given (not normalised).
    """
    a = torch.cat(
        [pair.a.to(dtype) * (weight * pair.scale) for pair, weight in zip(pairs, weights, strict=True)]
    )  # (sum_k r_k, in_features)
    b = torch.cat([pair.b.to(dtype) for pair in pairs], dim=1)  # (out_features, sum_k r_k)
    return LoraFactors(a=a, b=b, scale=1.0)


def stack_factors(updates: Sequence[Adapter], weights: Sequence[float]) -> Adapter:
    """Per module, the stacked pair whose product is ``sum_k p_k s_k B_k A_k`` (p: normalised weights).

    The exact weighted sum of the updates' products in factor form (FLoRA's stacking, and the input of
    FlexLoRA's SVD); accumulated in float32 or wider, the stacked rank is ``sum_k r_k``.
    """
    fractions = normalize_weights(weights, len(updates))
    stacked: Adapter = {}
    for module in common_modules(updates):
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        check_scales(module, pairs)
        stacked[module] = stack_products(pairs, fractions, accumulation_dtype(pairs[0].a))
    return stacked
