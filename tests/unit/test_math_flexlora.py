"""FlexLoRA: the QR-based low-rank SVD must equal the SVD of the dense float64 weighted sum."""

from __future__ import annotations

import pytest
import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.flexlora import lowrank_svd
from strategies.math.projection import balanced_factors, factors_from_svd, project_to_rank
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
def test_global_is_the_dense_truncated_svd(updates: list[Adapter], rank: int) -> None:
    """What the strategy keeps: balanced scale-1 factors of the leading ``rank`` components of W."""
    svds = lowrank_svd(updates, WEIGHTS, max_rank=rank)
    for name, (out_features, in_features) in MODULES.items():
        u, s, vh = torch.linalg.svd(dense_weighted_sum(updates, WEIGHTS, name), full_matrices=False)
        reference = (u[:, :rank] * s[:rank]) @ vh[:rank]
        pair = balanced_factors(svds[name], rank)
        assert pair.a.shape == (rank, in_features)
        assert pair.b.shape == (out_features, rank)
        assert pair.scale == 1.0
        assert pair.a.dtype == torch.float32
        assert relative_error(pair.product(), reference) < 1e-4


def test_one_svd_serves_every_node_rank(updates: list[Adapter]) -> None:
    svds = lowrank_svd(updates, WEIGHTS)
    name = "layers.0.v_proj"
    reference = dense_weighted_sum(updates, WEIGHTS, name)
    for rank, alpha in [(2, 4.0), (8, 16.0), (16, 32.0)]:
        pair = factors_from_svd(svds[name], rank, alpha)
        assert pair.rank == rank
        assert pair.scale == pytest.approx(alpha / rank)
        u, s, vh = torch.linalg.svd(reference, full_matrices=False)
        assert relative_error(pair.product(), (u[:, :rank] * s[:rank]) @ vh[:rank]) < 1e-4


def test_nodes_receive_the_best_approximation_of_their_rank(updates: list[Adapter]) -> None:
    """From the stored global, project_to_rank (what a node is sent) is the dense truncated SVD."""
    global_adapter = {n: balanced_factors(svd, 16) for n, svd in lowrank_svd(updates, WEIGHTS, 16).items()}
    name = "layers.0.q_proj"
    u, s, vh = torch.linalg.svd(dense_weighted_sum(updates, WEIGHTS, name), full_matrices=False)
    for rank in (2, 8, 16):
        pair = project_to_rank(global_adapter, rank, ALPHA, method="svd")[name]
        assert pair.rank == rank and pair.scale == pytest.approx(ALPHA / rank)
        assert relative_error(pair.product(), (u[:, :rank] * s[:rank]) @ vh[:rank]) < 1e-4


def test_all_zero_updates_give_a_zero_global_and_nodes_fresh_a(updates: list[Adapter]) -> None:
    zeroed = [
        {n: LoraFactors(a=p.a, b=torch.zeros_like(p.b), scale=p.scale) for n, p in u.items()} for u in updates
    ]
    global_adapter = {n: balanced_factors(svd, 8) for n, svd in lowrank_svd(zeroed, WEIGHTS, 8).items()}
    assert all(
        torch.count_nonzero(p.b) == 0 and torch.count_nonzero(p.a) == 0 for p in global_adapter.values()
    )
    pair = project_to_rank(global_adapter, 4, ALPHA, method="svd")["layers.0.q_proj"]
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
