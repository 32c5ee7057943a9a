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


def default_run_config() -> dict[str, Any]:
    """The run config `flwr run .` starts from."""
    return shipped_run_config()


@pytest.fixture
def run_config() -> dict[str, Any]:
    return default_run_config()


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """A random 2-layer Llama with a character tokenizer, saved like any local model folder."""
    import string

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.printable:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
