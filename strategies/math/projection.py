"""Project an adapter to a node's rank: by truncation (zero-padding style) or by an exact low-rank SVD.

The server keeps one global adapter but every node trains at its own rank and ``lora_alpha``. This module
turns factor pairs into the pair a node expects (rank ``r``, scale ``alpha / r``) while preserving the
product ``scale * B @ A`` as well as the rank allows. Nothing here forms a dense ``out x in`` matrix: the
SVD of ``B @ A`` is read off two thin QR factorisations and the SVD of a small ``rank x rank`` core.

Padding to a larger rank: zero A rows together with zero B columns would keep the product but could never
train (the gradient of each factor is proportional to the other). So new slots get zero B columns (the
product is unchanged) and small random A rows, drawn like PEFT's LoRA-A init from a seeded generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.common import lora_a_init_bound, pad_a, pad_b, truncate

PROJECTION_METHODS = ("truncate", "svd")
# Singular values at or below this fraction of the largest are numerically zero: the directions they
# belong to carry no update, so they become fresh trainable slots instead of near-dead factor pairs.
ZERO_SINGULAR_RTOL = 1e-6
# Seed of the generator used for new A rows when the caller passes none (so results are reproducible).
DEFAULT_PADDING_SEED = 0


@dataclass(frozen=True)
class SVDFactors:
    """Thin SVD ``u @ diag(s) @ vh`` of one module's update, singular values in descending order."""

    u: torch.Tensor  # (out_features, R), orthonormal columns
    s: torch.Tensor  # (R,), non-negative, descending
    vh: torch.Tensor  # (R, in_features), orthonormal rows

    def __post_init__(self) -> None:
        if self.u.dim() != 2 or self.s.dim() != 1 or self.vh.dim() != 2:
            raise ValueError("SVD factors must be u (out, R), s (R,), vh (R, in)")
        if not self.u.shape[1] == self.s.shape[0] == self.vh.shape[0]:
            raise ValueError(
                f"SVD factor ranks disagree: u {tuple(self.u.shape)}, s {tuple(self.s.shape)}, "
                f"vh {tuple(self.vh.shape)}"
            )

    @property
    def rank(self) -> int:
        return int(self.s.shape[0])

    def product(self, rank: int | None = None) -> torch.Tensor:
        """Dense rank-``rank`` truncation ``U_r S_r Vh_r``; (out_features, in_features). For tests."""
        r = self.rank if rank is None else min(rank, self.rank)
        return (self.u[:, :r] * self.s[:r]) @ self.vh[:r]


def fresh_a_rows(
    count: int, in_features: int, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``count`` new A rows drawn like a fresh LoRA A, so a slot with a zero B column can still learn."""
    bound = lora_a_init_bound(in_features)
    uniform = torch.rand((count, in_features), generator=generator, dtype=torch.float32)  # (count, in)
    return ((2.0 * uniform - 1.0) * bound).to(dtype)


def pad_rank(pair: LoraFactors, rank: int, generator: torch.Generator) -> LoraFactors:
    """Grow a pair to ``rank`` with zero B columns and fresh random A rows; product and scale unchanged."""
    extra = rank - pair.rank
    if extra < 0:
        raise ValueError(f"cannot pad a rank-{pair.rank} pair down to rank {rank}; truncate instead")
    in_features = pair.a.shape[1]
    a = torch.cat([pair.a, fresh_a_rows(extra, in_features, generator, pair.a.dtype)])  # (rank, in)
    b = torch.cat([pair.b, pair.b.new_zeros((pair.b.shape[0], extra))], dim=1)  # (out, rank)
    return LoraFactors(a=a, b=b, scale=pair.scale)


def svd_of_product(
    b: torch.Tensor, a: torch.Tensor, scale: float = 1.0, max_rank: int | None = None
) -> SVDFactors:
    """Exact thin SVD of ``scale * b @ a`` for ``b`` (out, R), ``a`` (R, in), never forming out x in.

    With ``b = Q1 R1`` and ``a^T = Q2 R2``: ``b @ a = Q1 (R1 R2^T) Q2^T``; the SVD ``U S V^T`` of the
    small core ``R1 R2^T`` gives ``b @ a = (Q1 U) S (Q2 V)^T``. ``max_rank`` keeps only the leading
    components (the largest rank any node needs). Computed in float64, returned in float32 (or float64).
    """
    out_dtype = torch.promote_types(torch.promote_types(b.dtype, a.dtype), torch.float32)
    q_b, r_b = torch.linalg.qr(b.double())  # (out, m_b), (m_b, R)
    q_a, r_a = torch.linalg.qr(a.double().T)  # (in, m_a), (m_a, R)
    core = float(scale) * (r_b @ r_a.T)  # (m_b, m_a), m_* <= R
    u_core, s, vh_core = torch.linalg.svd(core, full_matrices=False)  # (m_b, m), (m,), (m, m_a)
    if max_rank is not None:
        if max_rank < 1:
            raise ValueError(f"max_rank must be at least 1, got {max_rank}")
        u_core, s, vh_core = u_core[:, :max_rank], s[:max_rank], vh_core[:max_rank]
    # LAPACK returns Q column-major; multiplying through the transposes takes the fast matmul path.
    u = (u_core.T @ q_b.T).T  # (out, m)
    vh = vh_core @ q_a.T  # (m, in)
    return SVDFactors(
        u=u.to(out_dtype).contiguous(), s=s.to(out_dtype).contiguous(), vh=vh.to(out_dtype).contiguous()
    )


def _check_rank_alpha(rank: int, alpha: float) -> None:
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if not math.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(f"lora_alpha must be finite and positive, got {alpha}")


def factors_from_svd(
    svd: SVDFactors, rank: int, alpha: float, generator: torch.Generator | None = None
) -> LoraFactors:
    """Best rank-``rank`` LoRA pair with scale ``alpha / rank``: ``scale * B @ A == U_r S_r Vh_r``.

    ``sqrt(S)`` is split evenly between B and A (balanced factors) and divided by ``sqrt(scale)``. Slots
    beyond the SVD's rank, or whose singular value is numerically zero, get a zero B column and a fresh
    random A row (see the module docstring); ``generator`` seeds them (default: seed 0).
    """
    _check_rank_alpha(rank, alpha)
    scale = alpha / rank
    kept = min(rank, svd.rank)
    s = svd.s[:kept]  # (kept,)
    threshold = float(svd.s[0]) * ZERO_SINGULAR_RTOL if svd.rank > 0 else 0.0
    live = int((s > threshold).sum())  # singular values are descending, so these are the leading ones
    root = torch.sqrt(s[:live] / scale)  # (live,)
    pair = LoraFactors(
        a=root[:, None] * svd.vh[:live],  # (live, in_features)
        b=svd.u[:, :live] * root,  # (out_features, live)
        scale=scale,
    )
    if live == rank:
        return pair
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_PADDING_SEED)
    return pad_rank(pair, rank, generator)


def balanced_factors(svd: SVDFactors, rank: int) -> LoraFactors:
    """The leading ``rank`` SVD components as a scale-1.0 pair, ``sqrt(S)`` split evenly between B and A.

    Slots beyond the SVD's rank (a layer narrower than ``rank``) are zero in both A and B, so the product
    is ``U_r S_r Vh_r`` exactly. Meant for the server's global adapter, which nodes only ever receive
    through :func:`project_to_rank`; a node's own pair needs trainable slots (:func:`factors_from_svd`).
    Returned in float32.
    """
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    root = svd.s[:rank].clamp_min(0).sqrt()  # (kept,)
    return LoraFactors(
        a=pad_a((root[:, None] * svd.vh[:rank]).float(), rank),  # (rank, in_features)
        b=pad_b((svd.u[:, :rank] * root[None, :]).float(), rank),  # (out_features, rank)
        scale=1.0,
    )


def _project_by_truncation(
    module: str, pair: LoraFactors, rank: int, alpha: float, generator: torch.Generator
) -> LoraFactors:
    """Keep the first ``rank`` slots (or pad), then fold the change of scale into B."""
    resized = truncate({module: pair}, rank)[module] if rank <= pair.rank else pad_rank(pair, rank, generator)
    scale = alpha / rank
    # scale * (B * old/scale) @ A == old * B @ A: the kept slots' product is unchanged.
    return LoraFactors(a=resized.a, b=resized.b * (resized.scale / scale), scale=scale)


def _project_by_svd(
    module: str, pair: LoraFactors, rank: int, alpha: float, generator: torch.Generator
) -> LoraFactors:
    """Best rank-``rank`` approximation of the pair's product (exact when ``rank >= pair.rank``)."""
    return factors_from_svd(svd_of_product(pair.b, pair.a, pair.scale), rank, alpha, generator)


_PROJECTORS: dict[str, Callable[[str, LoraFactors, int, float, torch.Generator], LoraFactors]] = {
    "truncate": _project_by_truncation,
    "svd": _project_by_svd,
}


def project_to_rank(
    adapter: Adapter,
    rank: int,
    alpha: float,
    method: str,
    generator: torch.Generator | None = None,
) -> Adapter:
    """Re-express every pair at ``rank`` with scale ``alpha / rank`` (a node's own LoRA config).

    ``method="truncate"`` keeps the first ``rank`` slots (the zero-padding convention, cheap, lossy when
    shrinking); ``method="svd"`` keeps the best rank-``rank`` approximation of each product (exact when
    ``rank`` is at least the pair's rank). Growing the rank pads with zero B columns and random A rows
    drawn from ``generator`` (default: seed 0), so the product is unchanged and the new slots can train.
    """
    if method not in _PROJECTORS:
        raise ValueError(f"unknown projection method {method!r}; accepted: {', '.join(PROJECTION_METHODS)}")
    _check_rank_alpha(rank, alpha)
    if generator is None:
        generator = torch.Generator().manual_seed(DEFAULT_PADDING_SEED)
    project = _PROJECTORS[method]
    return {module: project(module, pair, rank, alpha, generator) for module, pair in adapter.items()}


def project_to_ranks(adapter: Adapter, ranks: Sequence[int], alpha: float, method: str) -> dict[int, Adapter]:
    """:func:`project_to_rank` for several ranks at once (rank -> adapter), equal to separate calls.

    With ``method="svd"`` each module's SVD is computed once and every rank is a slice of it, so a round
    costs one SVD per module instead of one per module and node rank.
    """
    wanted = sorted(set(ranks))
    if method != "svd":
        return {rank: project_to_rank(adapter, rank, alpha, method) for rank in wanted}
    for rank in wanted:
        _check_rank_alpha(rank, alpha)
    # One padding generator per rank, drawn in module order: the same draws as separate calls.
    generators = {rank: torch.Generator().manual_seed(DEFAULT_PADDING_SEED) for rank in wanted}
    out: dict[int, Adapter] = {rank: {} for rank in wanted}
    for module, pair in adapter.items():
        svd = svd_of_product(pair.b, pair.a, pair.scale)
        for rank in wanted:
            out[rank][module] = factors_from_svd(svd, rank, alpha, generators[rank])
    return out
