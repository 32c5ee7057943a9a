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


def test_micro_batches_give_the_whole_batch_step(host_and_tokenizer: tuple[LoraHost, object]) -> None:
    """Summed micro-batch gradients (8 rows as 3 + 3 + 2, uneven responses) take the same AdamW step as
    the batch in one pass, and report the same loss."""
    host, tokenizer = host_and_tokenizer
    rows = [{**EXAMPLE, "input": "abcdefgh"[: n + 1], "output": "hgfedcba"[: 8 - n]} for n in range(8)]
    examples = tokenize_all(tokenizer, rows, 256)
    batch = collate(examples, tokenizer.pad_token_id)  # type: ignore[attr-defined]
    start = host.read()
    before = {m: (f.a.clone(), f.b.clone()) for m, f in start.items()}
    results = {}
    for size in (0, 3):
        host.write(start)
        result = train_steps(
            host.model, host.trainable_parameters(), iter([batch]), 1, 0.01, torch.device("cpu"), size
        )
        results[size] = (result.mean_loss, {m: (f.a.clone(), f.b.clone()) for m, f in host.read().items()})
    (whole_loss, whole), (micro_loss, micro) = results[0], results[3]
    assert micro_loss == pytest.approx(whole_loss, rel=1e-5)
    moved = max(float((whole[m][0] - before[m][0]).abs().max()) for m in whole)
    assert moved > 1e-4  # the step did move the factors, so equal factors below are not trivial
    for module in whole:
        assert torch.allclose(whole[module][0], micro[module][0], atol=1e-6)
        assert torch.allclose(whole[module][1], micro[module][1], atol=1e-6)


def test_micro_batches_cut_rows_and_keep_every_key() -> None:
    from pollen.training import micro_batches

    batch = {"input_ids": torch.arange(10).reshape(5, 2), "labels": torch.zeros(5, 2)}
    parts = micro_batches(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])
    assert micro_batches(batch, 0) == [batch] and micro_batches(batch, 5) == [batch]


def test_generation_sorted_by_prompt_length_answers_each_prompt_in_input_order(
    host_and_tokenizer: tuple[LoraHost, object],
) -> None:
    """Batches of similar prompt length give each prompt the answer it gets alone, returned in input order."""
    from tasks.evaluation import generate_answers

    host, tokenizer = host_and_tokenizer
    rows = [{**EXAMPLE, "input": "abcdefghijklmnop"[:n]} for n in (9, 1, 14, 4, 11, 2, 7)]
    examples = tokenize_all(tokenizer, rows, 256)
    lengths = [e.prompt_length for e in examples]
    assert lengths != sorted(lengths)  # the input order is not the batching order
    batched = generate_answers(host.model, tokenizer, examples, 6, batch_size=3)
    alone = [generate_answers(host.model, tokenizer, [e], 6, batch_size=1)[0] for e in examples]
    assert batched == alone


def test_a_new_adapter_leaves_the_model_scoring_without_dropout(
    host_and_tokenizer: tuple[LoraHost, object],
) -> None:
    """PEFT creates a new adapter's layers in training mode; scoring with its dropout on would draw from
    the global generator and give the same adapter different figures each time."""
    host, tokenizer = host_and_tokenizer
    host.activate(2)
    try:
        assert not any(module.training for module in host.model.modules())
        examples = tokenize_all(tokenizer, [EXAMPLE] * 4, 256)
        state = torch.get_rng_state()
        first = response_loss(host.model, examples, tokenizer.pad_token_id, batch_size=2)  # type: ignore[attr-defined]
        assert torch.equal(state, torch.get_rng_state())
        assert response_loss(host.model, examples, tokenizer.pad_token_id, batch_size=2) == first  # type: ignore[attr-defined]
    finally:
        host.activate(4)
