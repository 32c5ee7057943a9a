"""Any architecture by default: 'all-linear' on tiny GPT-2 (Conv1D) and Qwen2 models, real 4-bit PEFT.

Each model is random, built here with the embedded byte-level tokenizer and saved like any local model.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from pollen.adapter import LoraFactors
from pollen.config import ConfigError, LoraConfig, ModelConfig, parse_run_config
from pollen.model import LoraHost, check_target_modules, load_base_model
from pollen.targets import ALL_LINEAR, TargetModulesError, model_fingerprint, resolve_target_modules
from pollen.training import train_steps
from tasks.embedded import resolve_model_name

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPECTED = {"gpt2": ("c_attn", "c_proj", "c_fc"), "qwen2": LLAMA_PROJECTIONS}
DEFAULT_LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=(ALL_LINEAR,))


def _save_tiny(kind: str, folder: Path) -> Path:
    """A random 2-layer GPT-2 or Qwen2 (widths multiples of 64, as 4-bit blocks want) and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    from scripts.build_base_model import build_tokenizer

    tokenizer = build_tokenizer()
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(0)
    model: Any
    if kind == "gpt2":
        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=128, **ids)
        )
    else:
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **ids,
        )
        model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gpt2", "qwen2"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    kind = str(request.param)
    return kind, _save_tiny(kind, tmp_path_factory.mktemp(kind))


def _load(folder: Path, quantization: str = "4bit") -> torch.nn.Module:
    return load_base_model(str(folder), ModelConfig(str(folder), quantization, "cpu", "float32"))


def _fixed_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(4, 260, (4, 24), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _loss(host: LoraHost, batch: dict[str, torch.Tensor]) -> float:
    host.model.eval()
    with torch.no_grad():
        return float(host.model(**batch).loss)


def test_default_targets_every_linear_layer_but_the_head_and_training_lowers_the_loss(
    tiny: tuple[str, Path],
) -> None:
    import bitsandbytes as bnb

    kind, folder = tiny
    base = _load(folder, "4bit")
    host = LoraHost(base, DEFAULT_LORA, seed=0)
    assert host.target_modules == EXPECTED[kind]
    host.activate(4)
    adapted = host.read()
    assert adapted and not any("lm_head" in module for module in adapted)
    assert len(adapted) == 2 * (3 if kind == "gpt2" else 7) + (2 if kind == "gpt2" else 0)  # c_proj twice
    layer: Any = dict(base.named_modules())[next(iter(adapted))]
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)  # GPT-2's Conv1D too, once quantized
    batch = _fixed_batch()
    before = _loss(host, batch)
    result = train_steps(
        host.model, host.trainable_parameters(), itertools.repeat(batch), 8, 0.01, torch.device("cpu")
    )
    after = _loss(host, batch)
    assert result.steps == 8 and after < before - 0.05


def test_adapter_round_trips_and_fingerprint_ignores_quantization(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    quantized = LoraHost(_load(folder, "4bit"), DEFAULT_LORA, seed=0)
    full = LoraHost(_load(folder, "none"), DEFAULT_LORA, seed=0)
    assert quantized.fingerprint == full.fingerprint  # GPT-2: Linear4bit vs Conv1D, same (in, out)
    quantized.activate(4)
    full.activate(4)
    g = torch.Generator().manual_seed(1)
    changed = {
        m: LoraFactors(
            a=torch.randn(p.a.shape, generator=g), b=torch.randn(p.b.shape, generator=g), scale=p.scale
        )
        for m, p in quantized.read().items()
    }
    for host in (quantized, full):
        host.write(changed)  # the same keys and (rank, in) / (out, rank) shapes on both
        back = host.read()
        assert back.keys() == changed.keys()
        assert all(
            torch.equal(back[m].a, changed[m].a) and torch.equal(back[m].b, changed[m].b) for m in back
        )


@pytest.mark.parametrize("quantization", ["4bit", "none"])
def test_gpt2_update_is_scale_b_at_a_as_pollen_adapter_says(tmp_path: Path, quantization: str) -> None:
    """PEFT on Conv1D (fan_in_fan_out) and on its 4-bit Linear replacement both add x @ (scale B A)^T."""
    host = LoraHost(_load(_save_tiny("gpt2", tmp_path), quantization), DEFAULT_LORA, seed=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*fan_in_fan_out.*")  # PEFT's "fixing your config" warning
        host.activate(4)
    name = "transformer.h.0.mlp.c_fc"
    pair = host.read()[name]
    g = torch.Generator().manual_seed(2)
    pair = LoraFactors(
        a=torch.randn(pair.a.shape, generator=g), b=torch.randn(pair.b.shape, generator=g), scale=2.0
    )
    host.write({**host.read(), name: pair})
    layer: Any = dict(host.model.named_modules())["base_model.model." + name]
    assert layer.fan_in_fan_out == (quantization == "none")  # Conv1D stores (in, out); Linear4bit (out, in)
    x = torch.randn(1, 3, 64, generator=g)
    with torch.no_grad():
        adapted = layer(x)
        with host.model.disable_adapter():
            plain = layer(x)
    torch.testing.assert_close(adapted - plain, x @ pair.product().T, rtol=1e-4, atol=1e-4)


def test_a_name_the_model_lacks_fails_in_one_line_listing_its_linear_layers(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    wrong = "c_attn" if kind == "qwen2" else "q_proj"
    bad = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=(EXPECTED[kind][0], wrong))
    with pytest.raises(TargetModulesError) as on_model:
        LoraHost(_load(folder), bad)
    message = str(on_model.value)
    assert "\n" not in message and f"'{wrong}' matches no linear layer" in message
    assert f"its linear layers are {', '.join(EXPECTED[kind])}, lm_head" in message
    with pytest.raises(TargetModulesError) as preflight:  # the server's check, without loading weights
        check_target_modules(str(folder), bad.target_modules)
    assert str(preflight.value) == message


def test_preflight_check_resolves_like_the_loaded_model(tiny: tuple[str, Path]) -> None:
    kind, folder = tiny
    assert check_target_modules(str(folder), (ALL_LINEAR,)) == EXPECTED[kind]
    assert check_target_modules(str(folder), ("c_proj",) if kind == "gpt2" else ("v_proj",)) == (
        ("c_proj",) if kind == "gpt2" else ("v_proj",)
    )
    with pytest.raises(TargetModulesError, match="mixes 'all-linear' with module names"):
        check_target_modules(str(folder), (ALL_LINEAR, "c_fc"))


def test_all_linear_on_the_embedded_model_is_the_seven_llama_projections() -> None:
    model = _load(Path(resolve_model_name("embedded")))
    assert resolve_target_modules(model, (ALL_LINEAR,)) == LLAMA_PROJECTIONS
    explicit = model_fingerprint(model, LLAMA_PROJECTIONS)
    host = LoraHost(model, DEFAULT_LORA)
    assert (
        host.fingerprint == explicit == model_fingerprint(model, (ALL_LINEAR,))
    )  # committed runs stay valid
    host.activate(2)
    assert model_fingerprint(model, host.target_modules) == explicit  # also with PEFT's layers wrapped in


def test_shipped_default_is_all_linear_and_mixing_it_is_a_config_error(run_config: dict[str, Any]) -> None:
    assert parse_run_config(run_config).lora.target_modules == (ALL_LINEAR,)
    with pytest.raises(ConfigError, match=r"lora.target-modules='all-linear,q_proj' is not valid"):
        parse_run_config({**run_config, "lora.target-modules": "all-linear,q_proj"})


def test_pollen_check_names_the_models_layers_for_a_wrong_target(
    tiny: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from client_app.preflight import main

    kind, folder = tiny
    wrong = "c_attn" if kind == "qwen2" else "q_proj"
    code = main(
        ["--model", str(folder), "--quantization", "none", "--device", "cpu", "--target-modules", wrong]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 1
    assert last == (
        f"UNUSABLE: --target-modules '{wrong}': '{wrong}' matches no linear layer of this model; its linear "
        f"layers are {', '.join(EXPECTED[kind])}, lm_head (name some of them, or use 'all-linear')"
    )


def test_server_preflight_names_the_models_layers_before_anything_is_written(
    run_config: dict[str, Any], tmp_path: Path
) -> None:
    from server_app.preflight import preflight

    config = {**run_config, "lora.target-modules": "c_attn,q_proj", "output.dir": str(tmp_path / "out")}
    with pytest.raises(ConfigError) as error:
        preflight(config)
    assert error.value.problems == [
        "lora.target-modules='c_attn,q_proj': 'c_attn' matches no linear layer of this model; its linear "
        "layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head "
        "(name some of them, or use 'all-linear')"
    ]
    assert not (tmp_path / "out").exists()
