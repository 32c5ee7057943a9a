"""FlexLoRA: the QR-based low-rank SVD must equal the SVD of the dense float64 weighted sum."""

from __future__ import annotations

import pytest
import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.flexlora import flexlora_aggregate, lowrank_svd
from strategies.math.projection import adapter_from_svd
from tests.unit.factors import (
    ALPHA,
    MODULES,
    RANKS,
    WEIGHTS,
    dense_weighted_sum,
    random_adapter,
    relative_error,
)


@pytest.fixture(scope="module")
def updates() -> list[Adapter]:
    return [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]


def test_singular_values_match_dense_svd(updates: list[Adapter]) -> None:
    svds = lowrank_svd(updates, WEIGHTS)
    for name in MODULES:
        reference = torch.linalg.svdvals(dense_weighted_sum(updates, WEIGHTS, name))
        svd = svds[name]
        assert svd.rank == sum(RANKS)
        torch.testing.assert_close(
            svd.s.double(), reference[: svd.rank], rtol=1e-5, atol=1e-5 * float(reference[0])
        )
        # The dense sum has rank sum(RANKS): nothing is lost beyond it.
        assert float(reference[svd.rank :].max()) < 1e-10 * float(reference[0])


def test_svd_bases_are_orthonormal(updates: list[Adapter]) -> None:
    svd = lowrank_svd(updates, WEIGHTS)["layers.0.q_proj"]
    eye = torch.eye(svd.rank)
    torch.testing.assert_close(svd.u.T @ svd.u, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(svd.vh @ svd.vh.T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [4, 30])
def test_truncated_product_equals_dense_truncated_svd(updates: list[Adapter], rank: int) -> None:
    result = flexlora_aggregate(updates, WEIGHTS, rank, ALPHA)
    for name, (out_features, in_features) in MODULES.items():
        u, s, vh = torch.linalg.svd(dense_weighted_sum(updates, WEIGHTS, name), full_matrices=False)
        reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
        pair = result[name]
        assert pair.a.shape == (rank, in_features)
        assert pair.b.shape == (out_features, rank)
        assert pair.scale == pytest.approx(ALPHA / rank)
        assert pair.a.dtype == torch.float32
        assert relative_error(pair.product(), reference) < 1e-4


def test_factors_are_balanced(updates: list[Adapter]) -> None:
    """sqrt(S) is split evenly: column i of B and row i of A have the same norm."""
    pair = flexlora_aggregate(updates, WEIGHTS, 8, ALPHA)["layers.0.q_proj"]
    torch.testing.assert_close(
        torch.linalg.norm(pair.b, dim=0), torch.linalg.norm(pair.a, dim=1), rtol=1e-4, atol=0
    )


def test_one_svd_serves_every_node_rank(updates: list[Adapter]) -> None:
    svds = lowrank_svd(updates, WEIGHTS)
    name = "layers.0.v_proj"
    reference = dense_weighted_sum(updates, WEIGHTS, name)
    for rank, alpha in [(2, 4.0), (8, 16.0), (16, 32.0)]:
        pair = adapter_from_svd(svds, rank, alpha)[name]
        assert pair.rank == rank
        assert pair.scale == pytest.approx(alpha / rank)
        u, s, vh = torch.linalg.svd(reference, full_matrices=False)
        assert relative_error(pair.product(), (u[:, :rank] * s[:rank]) @ vh[:rank]) < 1e-4


def test_rank_above_the_sum_pads_with_trainable_slots(updates: list[Adapter]) -> None:
    pair = flexlora_aggregate(updates, WEIGHTS, 40, ALPHA)["layers.0.q_proj"]
    assert pair.rank == 40
    assert relative_error(pair.product(), dense_weighted_sum(updates, WEIGHTS, "layers.0.q_proj")) < 1e-5
    assert torch.count_nonzero(pair.b[:, 30:]) == 0
    assert bool((torch.linalg.norm(pair.a[30:], dim=1) > 0).all())


def test_all_zero_updates_give_zero_product_and_fresh_a(updates: list[Adapter]) -> None:
    zeroed = [
        {n: LoraFactors(a=p.a, b=torch.zeros_like(p.b), scale=p.scale) for n, p in u.items()} for u in updates
    ]
    pair = flexlora_aggregate(zeroed, WEIGHTS, 4, ALPHA)["layers.0.q_proj"]
    assert torch.count_nonzero(pair.b) == 0
    assert torch.isfinite(pair.a).all()
    assert bool((pair.a.abs().sum(dim=1) > 0).all())


def test_lowrank_svd_validates_weights(updates: list[Adapter]) -> None:
    with pytest.raises(ValueError, match="4 updates"):
        lowrank_svd(updates, [1.0, 2.0])


def test_max_rank_keeps_the_leading_components(updates: list[Adapter]) -> None:
    full = lowrank_svd(updates, WEIGHTS)["layers.0.q_proj"]
    capped = lowrank_svd(updates, WEIGHTS, max_rank=4)["layers.0.q_proj"]
    assert capped.rank == 4
    torch.testing.assert_close(capped.product(), full.product(4), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_rank"):
        lowrank_svd(updates, WEIGHTS, max_rank=0)
