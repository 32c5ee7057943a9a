"""FLoRA stacking with a global adapter: the stacked product must equal the dense float64 reference."""

from __future__ import annotations

import pytest
import torch

from pollen.adapter import Adapter, LoraFactors, add
from strategies.math.flora import stack_with_updates
from tests.unit.factors import ALPHA, MODULES, RANKS, WEIGHTS, dense, random_adapter, relative_error


def _federation() -> tuple[Adapter, list[Adapter], list[Adapter]]:
    """A rank-16 global, and per node of RANKS what it received and what it holds after training."""
    global_adapter = random_adapter(16, 100)
    sent = [random_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    deltas = [random_adapter(rank, 50 + seed) for seed, rank in enumerate(RANKS)]
    trained = [add(received, delta) for received, delta in zip(sent, deltas, strict=True)]
    return global_adapter, sent, trained


def test_stack_equals_global_plus_weighted_changes_of_product() -> None:
    global_adapter, sent, trained = _federation()
    stacked = stack_with_updates(global_adapter, sent, trained, WEIGHTS)
    total = sum(WEIGHTS)
    for name, (out_features, in_features) in MODULES.items():
        pair = stacked[name]
        assert pair.scale == 1.0 and pair.a.dtype == torch.float64
        assert pair.a.shape == (16 + 2 * sum(RANKS), in_features)
        assert pair.b.shape == (out_features, 16 + 2 * sum(RANKS))
        expected = dense(global_adapter[name])
        for weight, before, after in zip(WEIGHTS, sent, trained, strict=True):
            expected = expected + (weight / total) * (dense(after[name]) - dense(before[name]))
        assert relative_error(pair.product(), expected) < 1e-12


def test_untrained_nodes_leave_the_global_product_unchanged() -> None:
    global_adapter, sent, _ = _federation()
    pair = stack_with_updates(global_adapter, sent, sent, WEIGHTS)["layers.0.q_proj"]
    assert relative_error(pair.product(), dense(global_adapter["layers.0.q_proj"])) < 1e-12


def test_stack_with_updates_validates_its_inputs() -> None:
    global_adapter, sent, trained = _federation()
    with pytest.raises(ValueError, match="4 received adapters but 3 trained"):
        stack_with_updates(global_adapter, sent, trained[:3], WEIGHTS)
    with pytest.raises(ValueError, match="non-negative"):
        stack_with_updates(global_adapter, sent, trained, [1.0, -1.0, 1.0, 1.0])
    narrow = dict(trained[0])
    narrow["layers.0.q_proj"] = LoraFactors(torch.zeros(2, 40), torch.zeros(64, 2), ALPHA / 2)
    with pytest.raises(ValueError, match="share the base model"):
        stack_with_updates(global_adapter, sent, [narrow, *trained[1:]], WEIGHTS)
    missing = {k: v for k, v in sent[0].items() if k != "layers.0.v_proj"}
    with pytest.raises(ValueError, match="different modules"):
        stack_with_updates(global_adapter, [missing, *sent[1:]], trained, WEIGHTS)
