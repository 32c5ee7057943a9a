"""FFA-LoRA: shared frozen A, B-only averaging, against ``np.average`` and dense-product references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pollen.adapter import Adapter, LoraFactors
from strategies.math.ffa import average_b, shared_a
from tests.unit.factors import ALPHA, MODULES, RANKS, WEIGHTS

SEED = 1234


def ffa_adapter(rank: int, seed: int) -> Adapter:
    """A node's trained FFA adapter: the shared A of its rank and a random (trained) B."""
    generator = torch.Generator().manual_seed(seed)
    adapter: Adapter = {}
    for name, (out_features, in_features) in MODULES.items():
        b = torch.randn((out_features, rank), generator=generator)  # (out, rank)
        adapter[name] = LoraFactors(a=shared_a((rank, in_features), SEED, name), b=b, scale=ALPHA / rank)
    return adapter


def test_shared_a_is_deterministic_nested_and_module_specific() -> None:
    a16 = shared_a((16, 48), SEED, "layers.0.q_proj")
    torch.testing.assert_close(shared_a((16, 48), SEED, "layers.0.q_proj"), a16, rtol=0, atol=0)
    torch.testing.assert_close(shared_a((4, 48), SEED, "layers.0.q_proj"), a16[:4], rtol=0, atol=0)
    assert not torch.equal(shared_a((16, 48), SEED, "layers.0.v_proj"), a16)
    assert not torch.equal(shared_a((16, 48), SEED + 1, "layers.0.q_proj"), a16)
    assert a16.dtype == torch.float32
    bound = 1 / np.sqrt(48)
    assert float(a16.abs().max()) <= bound
    assert float(a16.abs().max()) > 0.9 * bound


# shared_a((2, 4), 0, "model.layers.0.self_attn.q_proj") as first computed (torch 2.13 CPU generator).
PINNED_SHARED_A = [
    [-0.19661599397659302, 0.00025981664657592773, -0.245550274848938, 0.0665244460105896],
    [-0.46824389696121216, -0.08379077911376953, 0.03525996208190918, 0.49117839336395264],
]


def test_shared_a_does_not_drift() -> None:
    """Every node must derive the same A; pin a few values so a change to the derivation is noticed."""
    a = shared_a((2, 4), 0, "model.layers.0.self_attn.q_proj")
    expected = torch.tensor(PINNED_SHARED_A)
    torch.testing.assert_close(a, expected, rtol=0, atol=1e-7)


def test_nested_a_makes_the_average_exact() -> None:
    """With every A a prefix of one shared A, ``s_out * average_b @ A_max`` is the exact weighted sum."""
    updates = [ffa_adapter(rank, seed) for seed, rank in enumerate(RANKS)]
    total = sum(WEIGHTS)
    for name, (_, in_features) in MODULES.items():
        pairs = [u[name] for u in updates]
        out_scale = ALPHA / 16
        b = average_b([p.b for p in pairs], WEIGHTS, [p.scale for p in pairs], out_scale=out_scale)
        assert b.shape[1] == 16
        product = out_scale * (b.double() @ shared_a((16, in_features), SEED, name).double())
        exact = sum(
            (w / total) * p.scale * (p.b.double() @ p.a.double()) for w, p in zip(WEIGHTS, pairs, strict=True)
        )
        error = torch.linalg.norm(product - exact) / torch.linalg.norm(exact)
        assert float(error) < 1e-5


def test_average_b_matches_np_average_and_pads() -> None:
    generator = torch.Generator().manual_seed(0)
    bs = [torch.randn((8, r), generator=generator) for r in (2, 4)]
    result = average_b(bs, [1.0, 3.0])
    expected = np.average(
        [np.pad(bs[0].numpy(), ((0, 0), (0, 2))), bs[1].numpy()], axis=0, weights=[1.0, 3.0]
    )
    np.testing.assert_allclose(result.numpy(), expected, rtol=1e-6, atol=1e-7)
    scaled = average_b(bs, [1.0, 3.0], scales=[8.0, 4.0])  # first B counts twice at the output scale 4
    expected = np.average(
        [np.pad(2 * bs[0].numpy(), ((0, 0), (0, 2))), bs[1].numpy()], axis=0, weights=[1.0, 3.0]
    )
    np.testing.assert_allclose(scaled.numpy(), expected, rtol=1e-6, atol=1e-7)
    at_two = average_b(bs, [1.0, 3.0], scales=[8.0, 4.0], out_scale=2.0)  # both B's count double at scale 2
    np.testing.assert_allclose(at_two.numpy(), 2 * expected, rtol=1e-6, atol=1e-7)


def test_average_b_validates_arguments() -> None:
    bs = [torch.ones(4, 2), torch.ones(4, 2)]
    with pytest.raises(ValueError, match="non-negative"):
        average_b(bs, [-1.0, 1.0])
    with pytest.raises(ValueError, match="needs scales"):
        average_b(bs, [1.0, 1.0], out_scale=2.0)
    with pytest.raises(ValueError, match="out_features"):
        average_b([torch.ones(4, 2), torch.ones(5, 2)], [1.0, 1.0])
