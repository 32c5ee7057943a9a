"""FedIT averaging, against ``np.average`` references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.adapter import LoraFactors
from strategies.math.fedavg import average_factors
from tests.unit.factors import ALPHA, MODULES, random_adapter


def test_average_matches_np_average_of_each_factor() -> None:
    updates = [random_adapter(8, seed) for seed in range(3)]
    weights = [10.0, 30.0, 20.0]
    result = average_factors(updates, weights)
    for name in MODULES:
        expected_a = np.average(np.stack([u[name].a.numpy() for u in updates]), axis=0, weights=weights)
        expected_b = np.average(np.stack([u[name].b.numpy() for u in updates]), axis=0, weights=weights)
        np.testing.assert_allclose(result[name].a.numpy(), expected_a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(result[name].b.numpy(), expected_b, rtol=1e-5, atol=1e-6)
        assert result[name].scale == ALPHA / 8


def test_product_of_means_is_not_mean_of_products() -> None:
    """The documented FedIT bias: averaging factors separately does not average the updates."""
    updates = [random_adapter(4, seed) for seed in range(2)]
    result = average_factors(updates, [1.0, 1.0])
    name = "layers.0.q_proj"
    mean_of_products = torch.stack([u[name].product().double() for u in updates]).mean(dim=0)
    gap = torch.linalg.norm(result[name].product().double() - mean_of_products) / torch.linalg.norm(
        mean_of_products
    )
    assert gap > 0.1


def test_single_update_is_returned_unchanged() -> None:
    update = random_adapter(4, 0)
    result = average_factors([update], [3.0])
    for name in MODULES:
        torch.testing.assert_close(result[name].a, update[name].a)
        torch.testing.assert_close(result[name].b, update[name].b)


def test_unequal_ranks_are_rejected_with_module_and_ranks() -> None:
    with pytest.raises(ValueError, match=r"layers\.0\.q_proj.*ranks \[4, 8\]"):
        average_factors([random_adapter(4, 0), random_adapter(8, 1)], [1.0, 1.0])


def test_unequal_scales_are_rejected() -> None:
    left, right = random_adapter(4, 0), random_adapter(4, 1)
    right = {name: LoraFactors(a=p.a, b=p.b, scale=2 * p.scale) for name, p in right.items()}
    with pytest.raises(ValueError, match="equal scales"):
        average_factors([left, right], [1.0, 1.0])


def test_different_module_sets_are_rejected() -> None:
    left, right = random_adapter(4, 0), random_adapter(4, 1)
    del right["layers.0.v_proj"]
    with pytest.raises(ValueError, match="different modules"):
        average_factors([left, right], [1.0, 1.0])


def test_average_factors_validates_weights() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        average_factors([random_adapter(4, 0), random_adapter(4, 1)], [1.0, -2.0])
