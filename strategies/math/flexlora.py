"""FlexLoRA (Bai et al., NeurIPS 2024): sum the clients' full updates, then truncate by SVD to each rank.

The aggregate is ``W = sum_k p_k s_k B_k A_k`` (exact, any ranks), and each node receives the best
rank-``r`` approximation of ``W``. ``W`` is never formed: it is the product of the FLoRA stack
``B_cat @ A_cat`` of rank ``R = sum_k r_k``, whose SVD costs two thin QRs of ``out x R`` and ``in x R``
matrices and the SVD of an ``R x R`` core (see ``projection.svd_of_product``), instead of the SVD of a
dense ``out x in`` matrix. Updates are factor pairs whose *products* are summed: if clients send factor
deltas, rebuild their trained factors (received + delta) before calling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pollen.adapter import Adapter
from strategies.math.flora import stack_factors
from strategies.math.projection import SVDFactors, adapter_from_svd, svd_of_product

__all__ = ["SVDFactors", "flexlora_aggregate", "lowrank_svd"]


def lowrank_svd(
    updates: Sequence[Adapter], weights: Sequence[float], max_rank: int | None = None
) -> dict[str, SVDFactors]:
    """Thin SVD of ``W = sum_k p_k s_k B_k A_k`` per module, of rank at most ``sum_k r_k``.

    Computed once per round; every node's adapter is then a cheap slice (``projection.adapter_from_svd``).
    ``max_rank`` (e.g. the largest node rank) keeps only the leading components, to save time and memory.
    """
    stacked = stack_factors(updates, weights)  # B_cat (out, R), A_cat = [p_k s_k A_k] (R, in), scale 1
    return {module: svd_of_product(pair.b, pair.a, pair.scale, max_rank) for module, pair in stacked.items()}


def flexlora_aggregate(
    updates: Sequence[Adapter],
    weights: Sequence[float],
    rank: int,
    alpha: float,
    generator: torch.Generator | None = None,
) -> Adapter:
    """One node's FlexLoRA adapter: the best rank-``rank`` approximation of ``W``, scale ``alpha / rank``."""
    return adapter_from_svd(lowrank_svd(updates, weights, max_rank=rank), rank, alpha, generator)
