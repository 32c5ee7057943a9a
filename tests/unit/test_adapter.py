"""Adapter <-> PEFT state dict <-> wire names, and factor arithmetic."""

from __future__ import annotations

import pytest
import torch

from pollen.adapter import (
    LoraFactors,
    adapter_from_state_dict,
    adapter_to_state_dict,
    add,
    flatten,
    subtract,
    unflatten,
)

PREFIX = "base_model.model.model.layers.0.self_attn."


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        PREFIX + "q_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        PREFIX + "q_proj.lora_B.weight": torch.randn(24, 4, generator=g),
        PREFIX + "v_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        PREFIX + "v_proj.lora_B.weight": torch.randn(8, 4, generator=g),
    }


def test_state_dict_round_trip_keeps_keys_values_and_scale() -> None:
    state = _state()
    adapter = adapter_from_state_dict(state, scale=4.0)
    assert sorted(adapter) == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    assert adapter["model.layers.0.self_attn.q_proj"].rank == 4
    assert adapter["model.layers.0.self_attn.q_proj"].scale == 4.0
    back = adapter_to_state_dict(adapter)
    assert back.keys() == state.keys()
    for key in state:
        assert torch.equal(back[key], state[key])


def test_unpaired_factor_is_an_error() -> None:
    state = _state()
    del state[PREFIX + "v_proj.lora_B.weight"]
    with pytest.raises(KeyError, match="v_proj"):
        adapter_from_state_dict(state, scale=1.0)


def test_flatten_unflatten_and_arithmetic() -> None:
    adapter = adapter_from_state_dict(_state(), scale=2.0)
    flat = flatten(adapter)
    assert all(k.endswith((".A", ".B")) for k in flat)
    again = unflatten(flat, scale=2.0)
    delta = subtract(add(again, adapter), adapter)
    for module, pair in adapter.items():
        assert torch.allclose(delta[module].a, pair.a) and torch.allclose(delta[module].b, pair.b)


def test_product_matches_scaled_matmul() -> None:
    pair = LoraFactors(a=torch.ones(2, 3), b=torch.ones(5, 2), scale=0.5)
    assert torch.equal(pair.product(), torch.full((5, 3), 1.0))


def test_rank_mismatch_is_rejected() -> None:
    with pytest.raises(ValueError, match="rank mismatch"):
        LoraFactors(a=torch.zeros(3, 4), b=torch.zeros(4, 2), scale=1.0)


def test_unflatten_rejects_stray_names() -> None:
    with pytest.raises(KeyError, match="end in .A or .B"):
        unflatten({"m.A": torch.zeros(1, 2), "m.B": torch.zeros(2, 1), "m.C": torch.zeros(1)}, scale=1.0)


def test_the_stored_form_keeps_factors_and_exact_scales_and_refuses_a_missing_scale() -> None:
    from pollen.adapter import from_stored, to_stored

    g = torch.Generator().manual_seed(0)
    adapter = {
        "q": LoraFactors(torch.randn(3, 8, generator=g), torch.randn(5, 3, generator=g), 16.0 / 3.0),
        "v": LoraFactors(torch.randn(3, 8, generator=g), torch.randn(4, 3, generator=g), 0.1),
    }
    stored = to_stored(adapter)
    assert sorted(stored) == ["q.A", "q.B", "q.scale", "v.A", "v.B", "v.scale"]
    back = from_stored(stored)
    for module, pair in adapter.items():
        assert torch.equal(back[module].a, pair.a) and back[module].scale == pair.scale  # float64: exact
    del stored["v.scale"]
    with pytest.raises(KeyError, match="lacks 'v.scale'"):
        from_stored(stored)
