"""Zero-padding (HetLoRA's layout): pad every client's factors to the largest rank, then average them.

Rank ``r_k`` factors are embedded in the top-left corner of rank ``R = max_k r_k`` factors (extra A rows
and extra B columns are zero), so ranks can differ. Like FedAvg it averages A and B separately, so the
product of the result is *not* the weighted sum of the clients' products unless there is one client.

Scale rule: the output keeps the scale of the first update with the largest rank (``s_out``), and each
client's B is multiplied by ``s_k / s_out`` before averaging, so every client's own product
``s_k B_k A_k`` is represented exactly at the output scale; no lora_alpha is assumed.

Averaging the clients' trained adapters is HetLoRA's rule; averaging their factor deltas and adding the
mean to a global adapter is what Pollen's ``zeropad`` strategy does (docs/STRATEGIES.md compares them).

Optional norm weights (HetLoRA's "sparsity-weighted aggregation"): per module, each client's weight is
multiplied by the Frobenius norm of its *trained* module ``s_k B'_k A'_k`` (:func:`hetlora_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pollen.adapter import Adapter, LoraFactors
from strategies.math.common import (
    check_layer_shapes,
    check_scales,
    common_modules,
    normalize_weights,
    pad_a,
    pad_b,
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


def _norm_weighted_fractions(pairs: Sequence[LoraFactors], fractions: Sequence[float]) -> list[float]:
    """Multiply each fraction by the norm of that client's module and renormalise."""
    scaled = [fraction * product_norm(pair) for fraction, pair in zip(fractions, pairs, strict=True)]
    total = math.fsum(scaled)
    if total <= 0.0 or not math.isfinite(total):
        # Every weighted module is zero (e.g. B still at its zero init): fall back to the plain weights.
        return list(fractions)
    return [value / total for value in scaled]


def hetlora_weights(trained: Sequence[Adapter], weights: Sequence[float]) -> dict[str, list[float]]:
    """HetLoRA's per-module client fractions: weight times ``||s_k B'_k A'_k||_F``, normalised over clients.

    ``trained`` are the clients' adapters after local training (received + delta), not their deltas:
    the norm of a delta's own product is second order and is zero for a client whose A did not move.
    With equal ``weights`` this is exactly HetLoRA's rule; if every module is zero, the plain fractions.
    """
    fractions = normalize_weights(weights, len(trained))
    module_fractions: dict[str, list[float]] = {}
    for module in common_modules(trained):
        pairs = [adapter[module] for adapter in trained]
        check_layer_shapes(module, pairs)
        check_scales(module, pairs)
        module_fractions[module] = _norm_weighted_fractions(pairs, fractions)
    return module_fractions


def zeropad_aggregate(
    updates: Sequence[Adapter], weights: Sequence[float], norm_of: Sequence[Adapter] | None = None
) -> Adapter:
    """Zero-pad every module's factors to the largest rank and average A and B separately.

    With ``norm_of`` (each client's trained adapter, in the order of ``updates``) the weights are
    HetLoRA's norm weights of :func:`hetlora_weights` instead of the plain normalised ``weights``.
    """
    fractions = normalize_weights(weights, len(updates))
    modules = common_modules(updates)
    if norm_of is None:
        per_module = {module: fractions for module in modules}
    else:
        if len(norm_of) != len(updates):
            raise ValueError(
                f"got {len(norm_of)} trained adapters for the norm weights of {len(updates)} updates; "
                "pass one per update, in the same order"
            )
        per_module = hetlora_weights(norm_of, weights)
        if set(per_module) != set(modules):
            raise ValueError(
                "the trained adapters passed as norm_of cover other modules than the updates; "
                "pass each client's received adapter plus its delta"
            )
    aggregated: Adapter = {}
    for module in modules:
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        scales = check_scales(module, pairs)
        ranks = [pair.rank for pair in pairs]
        max_rank = max(ranks)
        out_scale = scales[ranks.index(max_rank)]
        module_fractions = per_module[module]
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
