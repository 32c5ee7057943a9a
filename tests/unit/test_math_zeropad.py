"""Zero-padding aggregation and truncation, against padded ``np.average`` and dense-product references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.adapter import LoraFactors
from strategies.math.zeropad import product_norm, truncate, zeropad_aggregate
from tests.unit.factors import ALPHA, MODULES, RANKS, WEIGHTS, random_adapter, relative_error


def padded(array: np.ndarray, rows: int, cols: int) -> np.ndarray:
    out = np.zeros((rows, cols), dtype=np.float64)
    out[: array.shape[0], : array.shape[1]] = array
    return out


def test_padded_average_matches_np_average_with_scales_folded_into_b() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    result = zeropad_aggregate(updates, WEIGHTS)
    for name, (out_features, in_features) in MODULES.items():
        pair = result[name]
        assert pair.a.shape == (16, in_features)
        assert pair.b.shape == (out_features, 16)
        assert pair.scale == ALPHA / 16  # the largest-rank update's scale
        expected_a = np.average(
            [padded(u[name].a.numpy(), 16, in_features) for u in updates], axis=0, weights=WEIGHTS
        )
        expected_b = np.average(
            [padded(u[name].b.numpy() * u[name].scale / pair.scale, out_features, 16) for u in updates],
            axis=0,
            weights=WEIGHTS,
        )
        np.testing.assert_allclose(pair.a.numpy(), expected_a, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(pair.b.numpy(), expected_b, rtol=1e-5, atol=1e-5)


def test_single_update_keeps_its_product() -> None:
    update = random_adapter(8, 0)
    result = zeropad_aggregate([update], [5.0])
    for name in MODULES:
        torch.testing.assert_close(result[name].product(), update[name].product())


def test_scale_folding_preserves_a_smaller_rank_contribution() -> None:
    """With the rank-16 update weighted zero, the output (at scale 16/16) is exactly the rank-4 product."""
    big, small = random_adapter(16, 0), random_adapter(4, 1)
    result = zeropad_aggregate([big, small], [0.0, 1.0])
    for name in MODULES:
        assert result[name].scale == ALPHA / 16
        reference = small[name].b.double() @ small[name].a.double() * small[name].scale
        assert relative_error(result[name].product(), reference) < 1e-6


def test_product_is_biased_for_several_clients() -> None:
    """Known limitation: averaging padded factors does not give sum_k p_k s_k B_k A_k."""
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    result = zeropad_aggregate(updates, WEIGHTS)
    fractions = np.array(WEIGHTS) / sum(WEIGHTS)
    name = "layers.0.q_proj"
    exact = torch.stack(
        [float(p) * u[name].product().double() for p, u in zip(fractions, updates, strict=True)]
    ).sum(0)
    assert relative_error(result[name].product(), exact) > 0.1


def test_product_norm_matches_dense_norm() -> None:
    pair = random_adapter(8, 3)["layers.0.q_proj"]
    dense = torch.linalg.norm(pair.b.double() @ pair.a.double()) * pair.scale
    assert product_norm(pair) == pytest.approx(float(dense), rel=1e-10)


def test_norm_weighted_multiplies_weights_by_update_norms() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    result = zeropad_aggregate(updates, WEIGHTS, norm_weighted=True)
    name, (_, in_features) = "layers.0.q_proj", MODULES["layers.0.q_proj"]
    norms = [float(torch.linalg.norm(u[name].product().double())) for u in updates]
    module_weights = [w * n for w, n in zip(WEIGHTS, norms, strict=True)]
    expected_a = np.average(
        [padded(u[name].a.numpy(), 16, in_features) for u in updates], axis=0, weights=module_weights
    )
    np.testing.assert_allclose(result[name].a.numpy(), expected_a, rtol=1e-5, atol=1e-5)


def test_norm_weighted_falls_back_to_plain_weights_for_zero_updates() -> None:
    updates = [random_adapter(4, seed) for seed in range(2)]
    zeroed = [
        {n: LoraFactors(a=p.a, b=torch.zeros_like(p.b), scale=p.scale) for n, p in u.items()} for u in updates
    ]
    plain = zeropad_aggregate(zeroed, [1.0, 3.0])
    weighted = zeropad_aggregate(zeroed, [1.0, 3.0], norm_weighted=True)
    for name in MODULES:
        assert torch.isfinite(weighted[name].a).all()
        torch.testing.assert_close(weighted[name].a, plain[name].a)


def test_truncate_keeps_leading_slots_and_scale() -> None:
    adapter = random_adapter(16, 0)
    result = truncate(adapter, 4)
    for name, pair in adapter.items():
        assert result[name].a.shape == (4, pair.a.shape[1])
        assert result[name].b.shape == (pair.b.shape[0], 4)
        assert result[name].scale == pair.scale
        # Reference: the sum of the first four rank-one terms, built one outer product at a time.
        terms = [torch.outer(pair.b[:, i].double(), pair.a[i].double()) for i in range(4)]
        reference = torch.stack(terms).sum(dim=0) * pair.scale
        assert relative_error(result[name].product(), reference) < 1e-6


def test_truncate_to_full_rank_is_identity_and_rejects_growth() -> None:
    adapter = random_adapter(8, 0)
    same = truncate(adapter, 8)
    for name in MODULES:
        torch.testing.assert_close(same[name].product(), adapter[name].product())
    with pytest.raises(ValueError, match="project_to_rank"):
        truncate(adapter, 9)
    with pytest.raises(ValueError, match="at least 1"):
        truncate(adapter, 0)


def test_zeropad_validates_weights() -> None:
    with pytest.raises(ValueError, match="finite"):
        zeropad_aggregate([random_adapter(4, 0), random_adapter(8, 1)], [float("nan"), 1.0])
