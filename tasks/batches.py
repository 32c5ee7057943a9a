"""Tokenize Alpaca examples for causal-LM training with the loss on response tokens only."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tasks.prompts import format_prompt, format_response

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding positions)


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens; response tokens + EOS otherwise


def tokenize_example(tokenizer: Any, example: Mapping[str, str], max_seq_len: int) -> TokenizedExample:
    """Prompt + response + EOS, cut to ``max_seq_len`` from the right; prompt positions masked."""
    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(format_response(example), add_special_tokens=False)["input_ids"]
    response_ids = list(response_ids) + [tokenizer.eos_token_id]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    input_ids = (list(prompt_ids) + response_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_seq_len]
    return TokenizedExample(input_ids=input_ids, labels=labels)


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label IGNORE_INDEX."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (batch, seq)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tokenize_all(tokenizer: Any, dataset: Any, max_seq_len: int) -> list[TokenizedExample]:
    """Tokenize every example; ones whose response is cut away entirely are dropped (no signal)."""
    out = []
    for example in dataset:
        tokenized = tokenize_example(tokenizer, example, max_seq_len)
        if any(label != IGNORE_INDEX for label in tokenized.labels):
            out.append(tokenized)
    return out


def sample_batches(
    examples: Sequence[TokenizedExample], batch_size: int, pad_id: int, generator: torch.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (reshuffled every epoch), so `local-steps` is independent of data size."""
    if not examples:
        raise ValueError("no trainable examples: every example's response was cut by train.max-seq-len")
    while True:
        order = torch.randperm(len(examples), generator=generator).tolist()
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            if len(chunk) < batch_size and len(examples) >= batch_size:
                break  # keep batches full-sized when the data allows
            yield collate(chunk, pad_id)
