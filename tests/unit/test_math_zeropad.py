"""Zero-padding aggregation and HetLoRA's norm weights, against padded ``np.average`` and dense references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.adapter import Adapter, LoraFactors, add
from strategies.math.zeropad import hetlora_weights, product_norm, zeropad_aggregate
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


def _mixed_federation() -> tuple[list[Adapter], list[Adapter]]:
    """Per node of RANKS (lora_alpha 8, 16, 32, 16): its factor delta and its trained adapter.

    Node 1's A delta is exactly zero while its B moved, as when A is frozen or its gradient vanished.
    """
    alphas = [8.0, 16.0, 32.0, 16.0]
    deltas, trained = [], []
    for seed, (rank, alpha) in enumerate(zip(RANKS, alphas, strict=True)):
        sent = {n: LoraFactors(p.a, p.b, alpha / rank) for n, p in random_adapter(rank, seed).items()}
        delta = {
            n: LoraFactors(0.1 * p.a, 0.1 * p.b, alpha / rank)
            for n, p in random_adapter(rank, 9 + seed).items()
        }
        if seed == 1:
            delta = {n: LoraFactors(torch.zeros_like(p.a), p.b, p.scale) for n, p in delta.items()}
        deltas.append(delta)
        trained.append(add(sent, delta))
    return deltas, trained


def _dense_norm_fractions(trained: list[Adapter], name: str) -> list[float]:
    """Reference: weight times ``||s B' A'||_F`` of the dense trained module, normalised."""
    norms = [
        float(torch.linalg.norm(t[name].scale * (t[name].b.double() @ t[name].a.double()))) for t in trained
    ]
    scaled = [w * n for w, n in zip(WEIGHTS, norms, strict=True)]
    return [value / sum(scaled) for value in scaled]


def test_hetlora_weights_are_the_dense_norms_of_the_trained_modules() -> None:
    deltas, trained = _mixed_federation()
    fractions = hetlora_weights(trained, WEIGHTS)
    assert list(fractions) == list(MODULES)
    for name in MODULES:
        assert fractions[name] == pytest.approx(_dense_norm_fractions(trained, name), rel=1e-9)
        # A node whose A did not move still updated its module: its weight is not zero...
        assert fractions[name][1] > 0.0
        # ...although the product of its factor delta, the old (second-order) norm, is exactly zero.
        assert product_norm(deltas[1][name]) == 0.0


def test_norm_weighted_aggregate_averages_the_deltas_with_hetlora_weights() -> None:
    deltas, trained = _mixed_federation()
    result = zeropad_aggregate(deltas, WEIGHTS, norm_of=trained)
    for name, (out_features, in_features) in MODULES.items():
        module_weights = _dense_norm_fractions(trained, name)
        pair = result[name]
        assert pair.scale == deltas[3][name].scale  # the largest-rank update's scale
        expected_a = np.average(
            [padded(d[name].a.numpy(), 16, in_features) for d in deltas], axis=0, weights=module_weights
        )
        expected_b = np.average(
            [padded(d[name].b.numpy() * d[name].scale / pair.scale, out_features, 16) for d in deltas],
            axis=0,
            weights=module_weights,
        )
        np.testing.assert_allclose(pair.a.numpy(), expected_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(pair.b.numpy(), expected_b, rtol=1e-5, atol=1e-6)


def test_norm_weights_fall_back_to_plain_weights_for_zero_modules() -> None:
    updates = [random_adapter(4, seed) for seed in range(2)]
    zeroed = [
        {n: LoraFactors(a=p.a, b=torch.zeros_like(p.b), scale=p.scale) for n, p in u.items()} for u in updates
    ]
    assert hetlora_weights(zeroed, [1.0, 3.0]) == dict.fromkeys(MODULES, [0.25, 0.75])
    plain = zeropad_aggregate(updates, [1.0, 3.0])
    weighted = zeropad_aggregate(updates, [1.0, 3.0], norm_of=zeroed)
    for name in MODULES:
        assert torch.equal(weighted[name].a, plain[name].a)
        assert torch.equal(weighted[name].b, plain[name].b)


def test_norm_of_must_match_the_updates() -> None:
    deltas, trained = _mixed_federation()
    with pytest.raises(ValueError, match="3 trained adapters .* of 4 updates"):
        zeropad_aggregate(deltas, WEIGHTS, norm_of=trained[:3])
    fewer = [{n: p for n, p in t.items() if n != "layers.0.v_proj"} for t in trained]
    with pytest.raises(ValueError, match="other modules"):
        zeropad_aggregate(deltas, WEIGHTS, norm_of=fewer)


def test_zeropad_validates_weights() -> None:
    with pytest.raises(ValueError, match="finite"):
        zeropad_aggregate([random_adapter(4, 0), random_adapter(8, 1)], [float("nan"), 1.0])
