"""Held-out evaluation: response-token loss and exact match of greedy generations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from tasks.batches import IGNORE_INDEX, TokenizedExample, collate
from tasks.prompts import format_prompt, format_response


@torch.no_grad()
def response_loss(model: Any, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int) -> float:
    """Mean cross-entropy over all response tokens (token-weighted, not batch-weighted)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # (batch, seq-1, vocab) predicts (batch, seq-1) next tokens
        shift_logits = logits[:, :-1, :].float()
        shift_labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total += float(losses)
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def normalise_answer(text: str) -> str:
    """Compare answers without surrounding white space."""
    return text.strip()


@torch.no_grad()
def exact_match(model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int, batch_size: int) -> float:
    """Share of prompts whose greedy continuation (up to EOS) equals the reference output exactly."""
    device = next(model.parameters()).device
    rows = list(dataset)
    hits = 0
    previous_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the right edge
    try:
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            prompts = [format_prompt(r) for r in chunk]
            if tokenizer.bos_token_id is not None:
                prompts = [tokenizer.bos_token + p for p in prompts]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            generated = out[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
            answers = [normalise_answer(format_response(r)) for r in chunk]
            hits += sum(normalise_answer(t) == a for t, a in zip(texts, answers, strict=True))
    finally:
        tokenizer.padding_side = previous_side
    return hits / max(len(rows), 1)
