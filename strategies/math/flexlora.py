"""FlexLoRA (Bai et al., NeurIPS 2024): sum the clients' full updates, then truncate by SVD to each rank.

The aggregate is ``W = sum_k p_k s_k B_k A_k`` (exact, any ranks). ``W`` is never formed: it is the
product of the stacked factors ``B_cat @ A_cat`` of rank ``R = sum_k r_k`` (``common.stack_factors``),
whose SVD costs two thin QRs of ``out x R`` and ``in x R`` matrices and the SVD of an ``R x R`` core
(``projection.svd_of_product``), instead of the SVD of a dense ``out x in`` matrix. The server keeps the
leading components as balanced factors (``projection.balanced_factors``) and each node receives the best
rank-``r`` approximation of them (``projection.project_to_rank(..., method="svd")``). Updates are factor
pairs whose *products* are summed: if clients send factor deltas, rebuild their trained factors
(received + delta) before calling.
"""

from __future__ import annotations

from collections.abc import Sequence

from pollen.adapter import Adapter
from strategies.math.common import stack_factors
from strategies.math.projection import SVDFactors, svd_of_product


def lowrank_svd(
    updates: Sequence[Adapter], weights: Sequence[float], max_rank: int | None = None
) -> dict[str, SVDFactors]:
    """Thin SVD of ``W = sum_k p_k s_k B_k A_k`` per module, of rank at most ``sum_k r_k``.

    Computed once per round from the stacked factors. ``max_rank`` (e.g. the largest node rank) keeps
    only the leading components, to save time and memory.
    """
    stacked = stack_factors(updates, weights)  # B_cat (out, R), A_cat = [p_k s_k A_k] (R, in), scale 1
    return {module: svd_of_product(pair.b, pair.a, pair.scale, max_rank) for module, pair in stacked.items()}
