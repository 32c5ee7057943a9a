"""Unit tests of error feedback: the residual bookkeeping, and that it stops quantization drift."""

from __future__ import annotations

import pytest
import torch

from pollen.codec import WireSpec, roundtrip
from pollen.error_feedback import compensate, new_residual


def test_first_round_has_nothing_to_compensate_and_copies() -> None:
    delta = {"a": torch.ones(2, 3), "b": torch.arange(4.0)}
    out = compensate(delta, None)
    assert all(torch.equal(out[k], delta[k]) for k in delta)
    out["a"] += 1
    assert torch.equal(delta["a"], torch.ones(2, 3))  # no aliasing of the caller's tensors


def test_missing_residual_names_count_as_zero_and_stale_names_are_ignored() -> None:
    delta = {"a": torch.ones(2), "b": torch.ones(3, dtype=torch.float16)}
    out = compensate(delta, {"a": torch.full((2,), 0.5), "gone": torch.ones(7)})
    assert torch.equal(out["a"], torch.full((2,), 1.5))
    assert out["b"].dtype == torch.float32 and torch.equal(out["b"], torch.ones(3))
    assert set(out) == {"a", "b"}


def test_residual_of_another_shape_is_refused_with_the_tensor_named() -> None:
    with pytest.raises(ValueError, match=r"residual for 'a' has shape \(4, 8\), expected \(2, 8\)"):
        compensate({"a": torch.zeros(2, 8)}, {"a": torch.zeros(4, 8)})


def test_new_residual_is_what_quantization_lost() -> None:
    compensated = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[3.0]])}
    decoded = {"a": torch.tensor([0.75, 2.0]), "b": torch.tensor([[3.5]])}
    out = new_residual(compensated, decoded)
    assert torch.equal(out["a"], torch.tensor([0.25, 0.0])) and torch.equal(out["b"], torch.tensor([[-0.5]]))


def test_new_residual_needs_matching_names_and_shapes() -> None:
    with pytest.raises(ValueError, match="different names"):
        new_residual({"a": torch.zeros(2)}, {"b": torch.zeros(2)})
    with pytest.raises(ValueError, match="decoded tensor for 'a' has shape"):
        new_residual({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def _drifting_deltas(rounds: int) -> list[dict[str, torch.Tensor]]:
    """Random deltas whose small entries have a steady positive mean below half a 4-bit grid step.

    Each 64-element block holds one entry of 1 (so the block scale is ~1 and the 4-bit step ~1/7) and
    63 entries drawn from U(0, 0.06): round to nearest sends them as 0 every round.
    """
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for _ in range(rounds):
        small = torch.rand(16, 64, generator=gen) * 0.06  # (blocks, block_size)
        small[:, 0] = 1.0
        deltas.append({"w": small})
    return deltas


def _track(deltas: list[dict[str, torch.Tensor]], spec: WireSpec, feedback: bool) -> list[float]:
    """Per round, max |sum of true deltas - sum of decoded deltas| (what the server has accumulated)."""
    gen = torch.Generator().manual_seed(1)
    residual: dict[str, torch.Tensor] | None = None
    true_sum = torch.zeros(16, 64)
    sent_sum = torch.zeros(16, 64)
    errors = []
    for delta in deltas:
        to_send = compensate(delta, residual) if feedback else delta
        decoded = roundtrip(to_send, spec, gen)
        if feedback:
            residual = new_residual(to_send, decoded)
        true_sum += delta["w"]
        sent_sum += decoded["w"]
        errors.append(float((true_sum - sent_sum).abs().max()))
    return errors


@pytest.mark.parametrize("stochastic", [False, True])
def test_error_feedback_keeps_the_running_sum_within_one_quantization_error(stochastic: bool) -> None:
    deltas = _drifting_deltas(50)
    spec = WireSpec(4, stochastic=stochastic)
    with_feedback = _track(deltas, spec, feedback=True)
    # The running error is minus the latest residual: at most one grid step (half with round to nearest)
    # of a block scale that the carried residual can lift from 1 to at most 1 + step.
    step = 1 / 7
    bound = (step if stochastic else step / 2) * (1 + step) * (1 + 2**-7) + 1e-5
    assert max(with_feedback) <= bound
    assert max(with_feedback[-10:]) <= bound  # and it does not grow with rounds


def test_without_error_feedback_round_to_nearest_drifts() -> None:
    deltas = _drifting_deltas(50)
    spec = WireSpec(4, stochastic=False)
    without = _track(deltas, spec, feedback=False)
    with_feedback = _track(deltas, spec, feedback=True)
    # Every small entry is lost every round: the gap grows linearly, by 0.03 per round on average.
    assert without[49] > 1.5 and without[49] > 3 * without[9]
    assert without[49] > 20 * max(with_feedback)
