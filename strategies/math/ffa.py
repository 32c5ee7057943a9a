"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen at a shared random init, only B is trained and averaged.

With every node holding the same A, averaging B is exact: ``mean_k(B_k) @ A == mean_k(B_k @ A)``, so the
FedIT bias disappears and only half the factors travel. Every node and the server derive A from a seed
and the module name (:func:`shared_a`), so A need not be sent at all.

Heterogeneous ranks: the rank-``r`` A is the first ``r`` rows of the max-rank A (row ``i`` depends only on
seed, module and ``i``), so the A's are nested. B's are zero-padded to the largest rank and averaged, with
each ``B_k`` multiplied by ``s_k / s_out`` (:func:`average_b`); then ``s_out * B_avg @ A_max`` equals
``sum_k p_k s_k B_k A_k`` exactly. Pollen's strategy averages the B *deltas* this way at the global scale
and adds the mean to the global B; A never changes, so nodes need not send it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from strategies.math.common import (
    check_scale_values,
    lora_a_init_bound,
    normalize_weights,
    pad_b,
    weighted_sum,
)


def _row_seed(seed: int, module_name: str, row: int) -> int:
    """A 63-bit generator seed from (seed, module, row) that is the same in every process and Python run."""
    digest = hashlib.sha256(f"pollen-ffa-lora-a:{seed}:{module_name}:{row}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def shared_a(
    shape: tuple[int, int], seed: int, module_name: str, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The frozen A of ``module_name``, ``(rank, in_features)``, drawn like PEFT's LoRA-A init.

    Row ``i`` comes from its own generator seeded by a stable hash of (seed, module, i), so it is
    identical on every node and for every rank (a rank-4 A is the first 4 rows of the rank-16 A). Values
    are ``U(-1/sqrt(in), 1/sqrt(in))``, the bound of ``kaiming_uniform_(a=sqrt(5))``; they come from
    torch's CPU generator, so all nodes should run the same torch release.
    """
    rank, in_features = shape
    if rank < 1 or in_features < 1:
        raise ValueError(f"shape must be (rank, in_features) with both positive, got {shape}")
    bound = lora_a_init_bound(in_features)
    rows = []
    for row in range(rank):
        generator = torch.Generator().manual_seed(_row_seed(seed, module_name, row))
        uniform = torch.rand((in_features,), generator=generator, dtype=torch.float32)  # (in_features,)
        rows.append((2.0 * uniform - 1.0) * bound)
    return torch.stack(rows).to(dtype)  # (rank, in_features)


def average_b(
    bs: Sequence[torch.Tensor],
    weights: Sequence[float],
    scales: Sequence[float] | None = None,
    out_scale: float | None = None,
) -> torch.Tensor:
    """Weighted mean of B factors ``(out, r_k)``, zero-padded to the largest rank; (out, max_rank).

    Without ``scales`` the B's must share one scale. With ``scales``, each ``B_k`` is multiplied by
    ``scales[k] / out_scale`` first (``out_scale`` defaults to the scale of the first largest-rank B), so
    the result is meant to be used at ``out_scale``.
    """
    fractions = normalize_weights(weights, len(bs))
    out_features = bs[0].shape[0]
    for index, b in enumerate(bs):
        if b.dim() != 2 or b.shape[0] != out_features:
            raise ValueError(
                f"B factor {index} has shape {tuple(b.shape)}; "
                f"every B must be (out_features={out_features}, rank)"
            )
    ranks = [int(b.shape[1]) for b in bs]
    max_rank = max(ranks)
    if scales is None:
        if out_scale is not None:
            raise ValueError("out_scale needs scales: pass the scale of every B factor too")
        scaled = list(bs)
    else:
        if len(scales) != len(bs):
            raise ValueError(f"got {len(scales)} scales for {len(bs)} B factors; pass one scale per B")
        checked = check_scale_values("<B factors>", scales)
        target = checked[ranks.index(max_rank)] if out_scale is None else float(out_scale)
        if not target > 0.0:
            raise ValueError(f"out_scale must be positive, got {out_scale}")
        scaled = [b * (s / target) for b, s in zip(bs, checked, strict=True)]
    padded = [pad_b(b, max_rank) for b in scaled]  # each (out_features, max_rank)
    return weighted_sum(padded, fractions)
