"""Tokenization with response-only loss, the training loop, and held-out evaluation (tiny real model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from pollen.config import LoraConfig, ModelConfig
from pollen.model import LoraHost, load_base_model, load_tokenizer
from pollen.training import train_steps
from tasks.batches import IGNORE_INDEX, collate, sample_batches, tokenize_all, tokenize_example
from tasks.evaluation import exact_match, response_loss
from tasks.prompts import format_prompt

EXAMPLE = {"instruction": "Reverse the word.", "input": "abc", "output": "cba"}


@pytest.fixture(scope="module")
def host_and_tokenizer(tiny_model_dir: Path) -> tuple[LoraHost, object]:
    model = load_base_model(str(tiny_model_dir), ModelConfig(str(tiny_model_dir), "4bit", "cpu", "float32"))
    host = LoraHost(model, LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj")))
    host.activate(4)
    return host, load_tokenizer(str(tiny_model_dir))


def test_prompt_is_masked_and_response_plus_eos_is_learned(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenized = tokenize_example(tokenizer, EXAMPLE, max_seq_len=256)
    learned = [t for t in tokenized.labels if t != IGNORE_INDEX]
    assert tokenizer.decode(learned[:-1]) == "cba" and learned[-1] == tokenizer.eos_token_id
    prompt_len = len(tokenized.input_ids) - len(learned)
    assert tokenizer.decode(tokenized.input_ids[1:prompt_len]) == format_prompt(EXAMPLE)


def test_cut_examples_without_response_are_dropped(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert tokenize_all(tokenizer, [EXAMPLE], max_seq_len=10) == []
    assert len(tokenize_all(tokenizer, [EXAMPLE], max_seq_len=200)) == 1


def test_collate_pads_right_and_masks_padding(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    short = tokenize_example(tokenizer, EXAMPLE, 256)
    long = tokenize_example(tokenizer, {**EXAMPLE, "input": "abcdefgh", "output": "hgfedcba"}, 256)
    batch = collate([short, long], pad_id=tokenizer.pad_token_id)
    n = len(short.input_ids)
    assert batch["attention_mask"][0, n:].sum() == 0 and (batch["labels"][0, n:] == IGNORE_INDEX).all()


def test_batches_are_endless_and_seeded(tiny_model_dir: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_model_dir))
    examples = tokenize_all(tokenizer, [EXAMPLE] * 5, 256)
    first = [
        b["input_ids"].shape
        for _, b in zip(
            range(7), sample_batches(examples, 2, 0, torch.Generator().manual_seed(1)), strict=False
        )
    ]
    assert len(first) == 7 and all(shape[0] == 2 for shape in first)
    with pytest.raises(ValueError, match="no trainable examples"):
        next(sample_batches([], 2, 0, torch.Generator()))


def test_training_lowers_the_loss_of_what_it_sees(host_and_tokenizer: tuple[LoraHost, object]) -> None:
    host, tokenizer = host_and_tokenizer
    examples = tokenize_all(tokenizer, [EXAMPLE] * 8, 256)
    before = response_loss(host.model, examples, tokenizer.pad_token_id, batch_size=4)  # type: ignore[attr-defined]
    batches = sample_batches(examples, 4, tokenizer.pad_token_id, torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    result = train_steps(
        host.model, host.trainable_parameters(), batches, steps=15, lr=0.02, device=torch.device("cpu")
    )
    after = response_loss(host.model, examples, tokenizer.pad_token_id, batch_size=4)  # type: ignore[attr-defined]
    assert result.steps == 15 and result.seconds > 0
    assert before is not None and after is not None and after < before


def test_exact_match_counts_only_identical_answers(host_and_tokenizer: tuple[LoraHost, object]) -> None:
    host, tokenizer = host_and_tokenizer
    data = Dataset.from_list([EXAMPLE, {**EXAMPLE, "input": "xy", "output": "yx"}])
    score = exact_match(host.model, tokenizer, data, max_new_tokens=4, batch_size=2)
    assert score is not None and 0.0 <= score <= 1.0
    impossible = Dataset.from_list([{**EXAMPLE, "output": "\x7f" * 30}])
    assert exact_match(host.model, tokenizer, impossible, max_new_tokens=2, batch_size=1) == 0.0
