"""Shared aggregation primitives: weights, checks, sums, padding, truncation, stacking, against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pollen.adapter import LoraFactors
from strategies.math.common import (
    accumulation_dtype,
    check_layer_shapes,
    check_scale_values,
    common_modules,
    lora_a_init_bound,
    normalize_weights,
    pad_a,
    pad_b,
    pad_pair,
    stack_factors,
    stack_products,
    truncate,
    weighted_sum,
)
from tests.unit.factors import (
    MODULES,
    RANKS,
    WEIGHTS,
    dense,
    dense_weighted_sum,
    random_adapter,
    random_pair,
    relative_error,
)


def test_normalize_weights_sums_to_one() -> None:
    fractions = normalize_weights([1, 3, 0, 4], 4)
    assert fractions == pytest.approx([0.125, 0.375, 0.0, 0.5])
    assert math.fsum(fractions) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("weights", "count", "message"),
    [
        ([1.0, -1.0], 2, "non-negative"),
        ([1.0, float("nan")], 2, "finite"),
        ([1.0, float("inf")], 2, "finite"),
        ([0.0, 0.0], 2, "sum to"),
        ([1.0], 2, "1 weights for 2 updates"),
        ([], 0, "zero updates"),
    ],
)
def test_invalid_weights_are_rejected(weights: list[float], count: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        normalize_weights(weights, count)


def test_common_modules_keeps_order_and_rejects_different_sets() -> None:
    left, right = random_adapter(4, 0), random_adapter(4, 1)
    assert common_modules([left, right]) == list(MODULES)
    del right["layers.0.v_proj"]
    with pytest.raises(
        ValueError, match=r"update 1 covers different modules.*missing \['layers\.0\.v_proj'\]"
    ):
        common_modules([left, right])
    with pytest.raises(ValueError, match="zero updates"):
        common_modules([])


def test_layer_shape_and_scale_checks() -> None:
    pairs = [random_pair(4, 0), random_pair(8, 1)]
    assert check_layer_shapes("m", pairs) == (64, 48)
    with pytest.raises(ValueError, match="share the base model"):
        check_layer_shapes("m", [pairs[0], random_pair(4, 2, in_features=40)])
    assert check_scale_values("m", [2, 0.5]) == [2.0, 0.5]
    with pytest.raises(ValueError, match=r"'m'.*finite and positive"):
        check_scale_values("m", [1.0, 0.0])


def test_weighted_sum_matches_np_average_and_accumulates_in_float32() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn((5, 3), generator=generator).half() for _ in range(3)]
    fractions = normalize_weights([1.0, 2.0, 5.0], 3)
    total = weighted_sum(tensors, fractions)
    assert total.dtype == torch.float32 == accumulation_dtype(tensors[0])
    expected = np.average([t.float().numpy() for t in tensors], axis=0, weights=[1.0, 2.0, 5.0])
    np.testing.assert_allclose(total.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert accumulation_dtype(torch.zeros(1, dtype=torch.float64)) == torch.float64


def test_padding_appends_zero_slots_and_pad_pair_keeps_the_product() -> None:
    pair = random_pair(4, 3)
    assert torch.equal(pad_a(pair.a, 6)[:4], pair.a) and torch.count_nonzero(pad_a(pair.a, 6)[4:]) == 0
    assert torch.equal(pad_b(pair.b, 6)[:, :4], pair.b) and torch.count_nonzero(pad_b(pair.b, 6)[:, 4:]) == 0
    padded = pad_pair(pair, 16, 0.25)
    assert padded.rank == 16 and padded.scale == 0.25
    assert relative_error(padded.product(), dense(pair)) < 1e-6


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


def test_lora_a_init_bound_is_peft_kaiming_bound() -> None:
    weight = torch.nn.init.kaiming_uniform_(torch.empty(4, 48), a=math.sqrt(5))  # PEFT's LoRA-A init
    assert float(weight.abs().max()) <= lora_a_init_bound(48)
    assert lora_a_init_bound(48) == pytest.approx(1 / math.sqrt(48))


def test_stack_products_uses_the_weights_as_given() -> None:
    pairs = [random_pair(2, 0), random_pair(8, 1)]
    pair = stack_products(pairs, [2.0, -0.5], torch.float64)
    assert pair.a.dtype == torch.float64 and pair.scale == 1.0 and pair.rank == 10
    assert relative_error(pair.product(), 2.0 * dense(pairs[0]) - 0.5 * dense(pairs[1])) < 1e-12


def test_stacked_product_equals_weighted_sum_of_products() -> None:
    updates = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    stacked = stack_factors(updates, WEIGHTS)
    for name, (out_features, in_features) in MODULES.items():
        pair = stacked[name]
        assert pair.a.shape == (sum(RANKS), in_features)
        assert pair.b.shape == (out_features, sum(RANKS))
        assert pair.scale == 1.0
        assert relative_error(pair.b @ pair.a, dense_weighted_sum(updates, WEIGHTS, name)) < 1e-5


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
    bad = {n: LoraFactors(a=p.a, b=p.b, scale=float("nan")) for n, p in updates[1].items()}
    with pytest.raises(ValueError, match="finite and positive"):
        stack_factors([updates[0], bad], [1.0, 1.0])
