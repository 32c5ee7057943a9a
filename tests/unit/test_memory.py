"""Memory savers of the node: gradient checkpointing on the 4-bit base, and the released checkpoint file.

Component tier: the tiny Llama with real PEFT and real 4-bit bitsandbytes on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pollen.config import LoraConfig, ModelConfig
from pollen.model import LoraHost, enable_gradient_checkpointing, load_base_model, load_tokenizer
from pollen.training import response_cross_entropy, train_steps
from tasks.batches import collate, sample_batches, tokenize_all
from tasks.evaluation import generate_answers, response_loss
from tasks.synthetic import make_examples
from tests.conftest import save_tiny_llama

LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.05, target_modules=("all-linear",))


def _host(folder: Path, checkpointing: bool) -> LoraHost:
    base = load_base_model(str(folder), ModelConfig(str(folder), "4bit", "cpu", "float32"))
    host = LoraHost(base, LORA, seed=0, gradient_checkpointing=checkpointing)
    host.activate(4)
    # B starts at zero, so A would get no gradient in the first step: give B values to test both.
    host.write(
        {m: type(p)(a=p.a, b=torch.randn_like(p.b) * 0.1, scale=p.scale) for m, p in host.read().items()}
    )
    return host


def _batch(folder: Path) -> dict[str, torch.Tensor]:
    tokenizer = load_tokenizer(str(folder))
    examples = tokenize_all(tokenizer, make_examples(6, 0), 64)
    return collate(examples, tokenizer.pad_token_id)


def _loss_and_grads(host: LoraHost, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    host.model.train()
    torch.manual_seed(7)  # same dropout masks in both runs
    total, count = response_cross_entropy(host.model, batch)
    (total / count).backward()
    grads = {}
    for param_name, param in host.model.named_parameters():
        if "lora_" in param_name and param.requires_grad:
            assert param.grad is not None, param_name
            grads[param_name] = param.grad.detach().clone()
            param.grad = None
    host.model.eval()
    return float(total.detach()) / count, grads


def test_checkpointing_gives_the_same_loss_and_gradients_to_every_lora_factor(tiny_model_dir: Path) -> None:
    batch = _batch(tiny_model_dir)
    plain = _host(tiny_model_dir, checkpointing=False)
    checkpointed = _host(tiny_model_dir, checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.model.modules())
    plain.trainable_parameters()
    checkpointed.trainable_parameters()
    loss, grads = _loss_and_grads(plain, batch)
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert loss_ckpt == pytest.approx(loss, rel=1e-5)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == 2 * 7 * 2  # A and B, 7 layers, 2 blocks
    for name, grad in grads_ckpt.items():
        assert grad.abs().sum() > 0, f"{name} got no gradient under checkpointing"
        torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6)


def test_checkpointed_host_alternates_training_and_evaluation(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_all(tokenizer, make_examples(12, 1), 64)
    plain = _host(tiny_model_dir, checkpointing=False)
    checkpointed = _host(tiny_model_dir, checkpointing=True)
    results: list[tuple[Any, ...]] = []
    for host in (plain, checkpointed):
        figures: list[Any] = []
        for _ in range(2):  # train, evaluate, train again: the same LoraHost serves both in simulation
            torch.manual_seed(3)
            batches = sample_batches(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(3))
            result = train_steps(
                host.model, host.trainable_parameters(), batches, 2, 1e-2, torch.device("cpu")
            )
            assert not host.model.training
            figures += [result.mean_loss, response_loss(host.model, examples, tokenizer.pad_token_id, 8)]
        figures.append(generate_answers(host.model, tokenizer, examples[:4], 4, 4))
        results.append(tuple(figures))
    *numbers, answers = results[1]
    *expected, expected_answers = results[0]
    assert numbers == pytest.approx(expected, rel=1e-4)
    assert answers == expected_answers


def test_checkpointing_an_unsupported_model_says_how_to_fix() -> None:
    with pytest.raises(ValueError, match="train.gradient-checkpointing=true"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_4bit_load_releases_the_checkpoint_file(tmp_path: Path) -> None:
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc to see the process's file mappings")
    folder = save_tiny_llama(tmp_path / "model")
    model: Any = load_base_model(str(folder), ModelConfig(str(folder), "4bit", "cpu", "float32"))
    weights = str((folder / "model.safetensors").resolve())
    assert weights not in maps.read_text(), "the loaded 4-bit model still maps its checkpoint file"
    ids = torch.tensor([[1, 5, 9]])
    assert torch.isfinite(model(input_ids=ids).logits).all()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight or not getattr(
        model.config, "tie_word_embeddings", False
    )


def test_gradient_checkpointing_key_is_a_validated_bool(run_config: dict[str, Any]) -> None:
    from pollen.config import ConfigError, parse_run_config

    assert parse_run_config(run_config).train.gradient_checkpointing is False
    enabled = parse_run_config({**run_config, "train.gradient-checkpointing": True})
    assert enabled.train.gradient_checkpointing is True
    with pytest.raises(ConfigError, match="train.gradient-checkpointing"):
        parse_run_config({**run_config, "train.gradient-checkpointing": "maybe"})
