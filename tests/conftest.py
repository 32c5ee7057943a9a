"""Shared fixtures: the shipped run-config defaults, read from pyproject.toml as Flower reads them."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# Tests write under temporary folders only: keep the `datasets` cache out of the home folder.
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="pollen-test-datasets-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from scripts.flower_run import shipped_run_config  # noqa: E402


@pytest.fixture
def run_config() -> dict[str, Any]:
    """The run config `flwr run .` starts from."""
    return shipped_run_config()


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with the embedded model's byte-level tokenizer, saved like any local model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from scripts.build_base_model import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
