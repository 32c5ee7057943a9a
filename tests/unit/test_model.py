"""Component tests: real transformers + PEFT + 4-bit bitsandbytes on a tiny local Llama."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pollen.config import LoraConfig, ModelConfig
from pollen.model import (
    LoraHost,
    ModelNotFoundError,
    check_model_available,
    load_base_model,
    load_tokenizer,
)
from pollen.targets import model_fingerprint

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def _model(folder: Path, quantization: str = "4bit") -> torch.nn.Module:
    return load_base_model(str(folder), ModelConfig(str(folder), quantization, "cpu", "float32"))


def test_4bit_base_is_really_quantized_and_smaller(tiny_model_dir: Path) -> None:
    import bitsandbytes as bnb

    # transformers types these models loosely; Any lets the attribute chain through
    quantized: Any = _model(tiny_model_dir, "4bit")
    full: Any = _model(tiny_model_dir, "none")
    layer = quantized.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    weight: Any = layer.weight  # a bitsandbytes Params4bit
    assert weight.quant_type == "nf4"
    assert quantized.get_memory_footprint() < full.get_memory_footprint()
    assert not any(p.requires_grad for p in quantized.parameters())


def test_fingerprint_depends_on_shapes_not_quantization(tiny_model_dir: Path, tmp_path: Path) -> None:
    from tests.conftest import save_tiny_llama

    same = model_fingerprint(_model(tiny_model_dir, "4bit"), LORA.target_modules)
    assert same == model_fingerprint(_model(tiny_model_dir, "none"), LORA.target_modules)
    other = save_tiny_llama(tmp_path / "other", seed=1)
    assert model_fingerprint(_model(other), LORA.target_modules) == same  # same architecture, other weights


def test_host_keeps_one_adapter_per_rank_and_round_trips_factors(tiny_model_dir: Path) -> None:
    host = LoraHost(_model(tiny_model_dir), LORA, seed=0)
    slot4 = host.activate(4)
    fresh = host.read()
    assert slot4.scale == 2.0 and all(p.rank == 4 for p in fresh.values())
    assert all(torch.count_nonzero(p.b) == 0 for p in fresh.values())  # PEFT starts B at zero
    changed = {m: type(p)(a=p.a + 1.0, b=p.b + 0.5, scale=p.scale) for m, p in fresh.items()}
    host.write(changed)
    back = host.read()
    assert all(torch.allclose(back[m].b, changed[m].b) for m in changed)
    host.activate(8)
    assert all(p.rank == 8 for p in host.read().values())
    host.activate(4)
    assert all(torch.allclose(host.read()[m].a, changed[m].a) for m in changed)  # rank-4 adapter kept


def test_write_rejects_wrong_shapes(tiny_model_dir: Path) -> None:
    host = LoraHost(_model(tiny_model_dir), LORA, seed=0)
    host.activate(4)
    host.activate(2)
    small = host.read()
    host.activate(4)
    with pytest.raises(ValueError, match="rank-4 model expects"):
        host.write(small)


def test_unknown_target_modules_are_named(tiny_model_dir: Path) -> None:
    bad = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("c_attn",))
    with pytest.raises(ValueError, match="'c_attn' matches no linear layer"):
        LoraHost(_model(tiny_model_dir), bad)


def test_training_on_the_adapter_changes_only_lora(tiny_model_dir: Path) -> None:
    host = LoraHost(_model(tiny_model_dir), LORA, seed=0)
    host.activate(4)
    before = host.read()
    ids = torch.randint(4, 100, (2, 12))
    loss = host.model(input_ids=ids, labels=ids).loss
    loss.backward()
    params = host.trainable_parameters()
    assert params and all(p.grad is not None for p in params)
    torch.optim.SGD(params, lr=0.1).step()
    after = host.read()
    assert any(not torch.equal(after[m].b, before[m].b) for m in before)


def test_adapter_still_learns_after_a_no_grad_evaluation(tiny_model_dir: Path) -> None:
    """Evaluation must not switch the 4-bit layers to a kernel without backward (bitsandbytes' CPU repack)."""
    model = _model(tiny_model_dir)
    assert all(
        not m.support_avx512bf16_for_cpu for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")
    )
    host = LoraHost(model, LORA, seed=0)
    host.activate(4)
    ids = torch.randint(4, 100, (2, 12))
    host.model.eval()
    with torch.no_grad():
        host.model(input_ids=ids)
    host.model.train()
    host.model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for p in host.trainable_parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads if g is not None)


def test_missing_model_gives_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="is not a model folder") as info:
        check_model_available(str(tmp_path / "nowhere"))
    assert "\n" not in str(info.value)
    with pytest.raises(ModelNotFoundError, match="could not be found") as hub:
        check_model_available("no-such-org/no-such-model")
    assert "\n" not in str(hub.value)


def test_tokenizer_gets_a_pad_token(tiny_model_dir: Path) -> None:
    assert load_tokenizer(str(tiny_model_dir)).pad_token_id is not None
