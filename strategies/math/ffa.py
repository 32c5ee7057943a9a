"""FFA-LoRA (Sun et al., ICLR 2024): A is frozen at a shared random init, only B is trained and averaged.

With every node holding the same A, averaging B is exact: ``mean_k(B_k) @ A == mean_k(B_k @ A)``, so the
FedIT bias disappears and only half the factors travel. Every node and the server derive A from a seed
and the module name (:func:`shared_a`), so A need not be sent at all.

Heterogeneous ranks: the rank-``r`` A is the first ``r`` rows of the max-rank A (row ``i`` depends only on
seed, module and ``i``), so the A's are nested. B's are zero-padded to the largest rank and averaged, with
each ``B_k`` multiplied by ``s_k / s_out`` (``s_out``: the scale of the first largest-rank update); then
``s_out * B_avg @ A_max`` equals ``sum_k p_k s_k B_k A_k`` exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.fedavg import (
    check_layer_shapes,
    check_scale_values,
    check_scales,
    common_modules,
    normalize_weights,
    weighted_sum,
)
from strategies.math.projection import lora_a_init_bound
from strategies.math.zeropad import pad_b


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


def ffa_aggregate(updates: Sequence[Adapter], weights: Sequence[float], atol: float = 0.0) -> Adapter:
    """Average B only; A is returned unchanged (the largest-rank A, of which every other A is a prefix).

    Raises ValueError if some update's A differs from that prefix by more than ``atol`` (default: exact
    equality, since a frozen A decoded without loss is bit-identical); pass a tolerance if the wire codec
    quantizes A. When A is not transmitted, build it with :func:`shared_a` and call :func:`average_b`.
    """
    fractions = normalize_weights(weights, len(updates))
    aggregated: Adapter = {}
    for module in common_modules(updates):
        pairs = [update[module] for update in updates]
        check_layer_shapes(module, pairs)
        scales = check_scales(module, pairs)
        ranks = [pair.rank for pair in pairs]
        reference = ranks.index(max(ranks))
        a_max = pairs[reference].a  # (max_rank, in_features)
        for index, pair in enumerate(pairs):
            prefix = a_max[: pair.rank].to(pair.a.dtype)
            if not torch.allclose(pair.a, prefix, rtol=0.0, atol=atol):
                gap = float((pair.a - prefix).abs().max())
                raise ValueError(
                    f"module {module!r}: update {index} has an A that differs from the shared A by up to "
                    f"{gap:.3g} (tolerance {atol}); FFA-LoRA keeps A frozen, so every node must build it "
                    "with shared_a from the same seed and never train it"
                )
        b = average_b(
            [pair.b for pair in pairs], fractions, scales=scales, out_scale=scales[reference]
        )  # (out_features, max_rank)
        aggregated[module] = LoraFactors(a=a_max.clone(), b=b, scale=scales[reference])
    return aggregated
