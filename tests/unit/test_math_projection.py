"""Rank projection: exact SVD projection, truncation, and product-preserving padding, against dense SVDs."""

from __future__ import annotations

import pytest
import torch

from pollen.adapter import LoraFactors
from strategies.math.common import lora_a_init_bound
from strategies.math.projection import (
    SVDFactors,
    balanced_factors,
    factors_from_svd,
    project_to_rank,
    svd_of_product,
)
from tests.unit.factors import ALPHA, dense, random_pair, relative_error

NAME = "layers.3.self_attn.q_proj"


def test_svd_of_product_matches_dense_svd() -> None:
    pair = random_pair(8, 0)
    svd = svd_of_product(pair.b, pair.a, pair.scale)
    reference = torch.linalg.svdvals(dense(pair))
    assert svd.rank == 8
    torch.testing.assert_close(svd.s.double(), reference[:8], rtol=1e-5, atol=0)
    assert relative_error(svd.product(), dense(pair)) < 1e-5


def test_svd_projection_to_same_rank_reproduces_the_product() -> None:
    pair = random_pair(8, 1)
    result = project_to_rank({NAME: pair}, 8, 32.0, method="svd")[NAME]
    assert result.rank == 8
    assert result.scale == pytest.approx(32.0 / 8)
    assert relative_error(result.product(), dense(pair)) < 1e-5


def test_svd_projection_to_lower_rank_is_the_dense_truncated_svd() -> None:
    pair = random_pair(8, 2)
    result = project_to_rank({NAME: pair}, 4, ALPHA, method="svd")[NAME]
    u, s, vh = torch.linalg.svd(dense(pair), full_matrices=False)
    assert result.rank == 4
    assert result.scale == pytest.approx(ALPHA / 4)
    assert relative_error(result.product(), (u[:, :4] * s[:4]) @ vh[:4]) < 1e-4


@pytest.mark.parametrize("method", ["svd", "truncate"])
def test_padding_to_higher_rank_keeps_the_product_and_adds_trainable_slots(method: str) -> None:
    pair = random_pair(8, 3)
    result = project_to_rank({NAME: pair}, 16, ALPHA, method, generator=torch.Generator().manual_seed(7))[
        NAME
    ]
    assert result.rank == 16
    assert result.scale == pytest.approx(ALPHA / 16)
    assert relative_error(result.product(), dense(pair)) < 1e-5
    assert torch.count_nonzero(result.b[:, 8:]) == 0  # new B columns are zero: product unchanged
    new_rows = result.a[8:]
    assert bool((new_rows.abs().sum(dim=1) > 0).all())  # new A rows are not zero: B can learn
    assert float(new_rows.abs().max()) <= lora_a_init_bound(48)
    again = project_to_rank({NAME: pair}, 16, ALPHA, method, generator=torch.Generator().manual_seed(7))[NAME]
    torch.testing.assert_close(again.a, result.a)  # seeded: reproducible


def test_truncate_projection_keeps_leading_slots_at_the_node_scale() -> None:
    pair = random_pair(16, 4)
    result = project_to_rank({NAME: pair}, 4, 8.0, method="truncate")[NAME]
    assert result.scale == pytest.approx(8.0 / 4)
    torch.testing.assert_close(result.a, pair.a[:4])
    terms = [torch.outer(pair.b[:, i].double(), pair.a[i].double()) for i in range(4)]
    reference = pair.scale * torch.stack(terms).sum(dim=0)
    assert relative_error(result.product(), reference) < 1e-6


def test_factors_from_svd_scales_and_balances() -> None:
    pair = random_pair(6, 5)
    svd = svd_of_product(pair.b, pair.a, pair.scale)
    result = factors_from_svd(svd, 3, alpha=12.0)
    assert result.scale == pytest.approx(4.0)
    # scale * ||b_i|| * ||a_i|| = s_i and ||b_i|| = ||a_i||.
    torch.testing.assert_close(
        result.scale * torch.linalg.norm(result.b, dim=0) ** 2, svd.s[:3], rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        torch.linalg.norm(result.b, dim=0), torch.linalg.norm(result.a, dim=1), rtol=1e-5, atol=0
    )


@pytest.mark.parametrize(("out_features", "in_features", "rank"), [(64, 48, 4), (64, 48, 8), (6, 48, 8)])
def test_balanced_factors_are_the_dense_truncated_svd_at_scale_one(
    out_features: int, in_features: int, rank: int
) -> None:
    """Leading ``rank`` components, sqrt(S) on both sides; a layer narrower than the rank gets zero slots."""
    pair = random_pair(8, 8, out_features, in_features)
    svd = svd_of_product(pair.b, pair.a, pair.scale)
    result = balanced_factors(svd, rank)
    assert result.scale == 1.0 and result.rank == rank and result.a.dtype == torch.float32
    u, s, vh = torch.linalg.svd(dense(pair), full_matrices=False)
    assert relative_error(result.product(), (u[:, :rank] * s[:rank]) @ vh[:rank]) < 1e-5
    kept = min(rank, out_features)
    torch.testing.assert_close(
        torch.linalg.norm(result.b, dim=0)[:kept], torch.sqrt(s[:kept]).float(), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        torch.linalg.norm(result.a, dim=1)[:kept], torch.sqrt(s[:kept]).float(), rtol=1e-4, atol=0
    )
    assert torch.count_nonzero(result.a[kept:]) == 0 and torch.count_nonzero(result.b[:, kept:]) == 0
    with pytest.raises(ValueError, match="at least 1"):
        balanced_factors(svd, 0)


def test_invalid_arguments_are_rejected() -> None:
    pair = random_pair(4, 6)
    with pytest.raises(ValueError, match="accepted: truncate, svd"):
        project_to_rank({NAME: pair}, 4, ALPHA, method="dense")
    with pytest.raises(ValueError, match="at least 1"):
        project_to_rank({NAME: pair}, 0, ALPHA, method="svd")
    with pytest.raises(ValueError, match="lora_alpha"):
        project_to_rank({NAME: pair}, 4, -1.0, method="svd")
    with pytest.raises(ValueError, match="ranks disagree"):
        SVDFactors(u=torch.zeros(5, 3), s=torch.zeros(2), vh=torch.zeros(3, 4))


@pytest.mark.parametrize("method", ["truncate", "svd"])
def test_projecting_to_several_ranks_at_once_equals_separate_projections(method: str) -> None:
    """The shared-SVD route must give bit for bit what one project_to_rank call per rank gives."""
    from strategies.math.projection import project_to_ranks

    g = torch.Generator().manual_seed(11)
    adapter = {
        f"m{i}": LoraFactors(torch.randn(8, 24, generator=g), torch.randn(6 + i, 8, generator=g), 2.0)
        for i in range(3)  # m0 is narrower (6 outputs) than rank 8 and 16: padded slots draw fresh rows
    }
    together = project_to_ranks(adapter, [16, 2, 8, 2], alpha=16.0, method=method)
    assert sorted(together) == [2, 8, 16]
    for rank, projected in together.items():
        alone = project_to_rank(adapter, rank, 16.0, method)
        for module, pair in alone.items():
            assert torch.equal(projected[module].a, pair.a) and torch.equal(projected[module].b, pair.b)
            assert projected[module].scale == pair.scale
