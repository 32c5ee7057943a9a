"""FLoRA stacking: the stacked product must equal the dense float64 weighted sum of client products."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies.math.flora import fold_into_dense, reproject, stack_factors
from tests.unit.factors import (
    ALPHA,
    MODULES,
    RANKS,
    WEIGHTS,
    dense_weighted_sum,
    random_adapter,
    relative_error,
)


def test_stacked_product_equals_weighted_sum_of_products() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    stacked = stack_factors(updates, WEIGHTS)
    for name, (out_features, in_features) in MODULES.items():
        pair = stacked[name]
        assert pair.a.shape == (sum(RANKS), in_features)
        assert pair.b.shape == (out_features, sum(RANKS))
        assert pair.scale == 1.0
        assert relative_error(pair.b @ pair.a, dense_weighted_sum(updates, WEIGHTS, name)) < 1e-5


def test_fold_into_dense_gives_the_weighted_sum() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    dense = fold_into_dense(stack_factors(updates, WEIGHTS))
    for name, shape in MODULES.items():
        assert dense[name].shape == shape
        assert dense[name].dtype == torch.float32
        assert relative_error(dense[name], dense_weighted_sum(updates, WEIGHTS, name)) < 1e-6


def test_reproject_to_full_rank_is_exact_and_to_lower_rank_is_truncated_svd() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    stacked = stack_factors(updates, WEIGHTS)
    name = "layers.0.q_proj"
    reference = dense_weighted_sum(updates, WEIGHTS, name)
    full = reproject(stacked, 30, ALPHA)[name]
    assert full.rank == 30
    assert full.scale == pytest.approx(ALPHA / 30)
    assert relative_error(full.product(), reference) < 1e-5
    u, s, vh = torch.linalg.svd(reference, full_matrices=False)
    truncated_reference = (u[:, :8] * s[:8]) @ vh[:8]
    low = reproject(stacked, 8, ALPHA)[name]
    assert low.rank == 8
    assert relative_error(low.product(), truncated_reference) < 1e-4


@settings(max_examples=25, deadline=None, database=None)  # no .hypothesis/ folder in the repo
@given(
    ranks=st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=4),
    seed=st.integers(min_value=0, max_value=10_000),
    data=st.data(),
)
def test_stacking_is_exact_for_any_ranks_and_weights(
    ranks: list[int], seed: int, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.floats(0.1, 100.0), min_size=len(ranks), max_size=len(ranks)))
    modules = {"m": (7, 5)}
    updates = [random_adapter(rank, seed + k, modules) for k, rank in enumerate(ranks)]
    pair = stack_factors(updates, weights)["m"]
    assert pair.rank == sum(ranks)
    assert relative_error(pair.product(), dense_weighted_sum(updates, weights, "m")) < 1e-5


def test_stack_factors_validates_weights_and_shapes() -> None:
    updates = [random_adapter(4, 0), random_adapter(8, 1)]
    with pytest.raises(ValueError, match="sum to"):
        stack_factors(updates, [0.0, 0.0])
    other = random_adapter(4, 2, {"layers.0.q_proj": (64, 40), "layers.0.v_proj": (32, 48)})
    with pytest.raises(ValueError, match="share the base model"):
        stack_factors([updates[0], other], [1.0, 1.0])
