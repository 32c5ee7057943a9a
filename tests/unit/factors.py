"""Random LoRA factors and dense references shared by the aggregation-math tests."""

from __future__ import annotations

import torch

from pollen.adapter import Adapter, LoraFactors

ALPHA = 16.0
RANKS = [2, 4, 8, 16]
WEIGHTS = [10.0, 40.0, 30.0, 20.0]
MODULES = {"layers.0.q_proj": (64, 48), "layers.0.v_proj": (32, 48)}  # name -> (out_features, in_features)


def random_pair(rank: int, seed: int, out_features: int = 64, in_features: int = 48) -> LoraFactors:
    """One module's factors, A (rank, in) and B (out, rank), at scale alpha / rank."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn((rank, in_features), generator=generator)
    b = torch.randn((out_features, rank), generator=generator)
    return LoraFactors(a=a, b=b, scale=ALPHA / rank)


def random_adapter(rank: int, seed: int, modules: dict[str, tuple[int, int]] = MODULES) -> Adapter:
    """Factors for every module, drawn from one seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    for name, (out_features, in_features) in modules.items():
        a = torch.randn((rank, in_features), generator=generator)
        b = torch.randn((out_features, rank), generator=generator)
        adapter[name] = LoraFactors(a=a, b=b, scale=ALPHA / rank)
    return adapter


def dense(pair: LoraFactors) -> torch.Tensor:
    """The update ``s B A`` in float64."""
    return pair.scale * (pair.b.double() @ pair.a.double())


def dense_weighted_sum(updates: list[Adapter], weights: list[float], name: str) -> torch.Tensor:
    """Reference ``sum_k p_k s_k B_k A_k`` in float64 (p = normalised weights), formed directly."""
    total = sum(weights)
    return torch.stack([(w / total) * dense(u[name]) for w, u in zip(weights, updates, strict=True)]).sum(
        dim=0
    )


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Frobenius norm of the difference relative to the reference's."""
    return float(torch.linalg.norm(value.double() - reference) / torch.linalg.norm(reference))
