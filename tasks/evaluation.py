"""Held-out evaluation: response-token loss, and a score of greedy generations (tasks/metrics.py).

Both return None for zero examples: a loss or an accuracy over nothing is not a number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pollen.training import response_cross_entropy
from tasks.batches import TokenizedExample, collate, collate_prompts, tokenize_all
from tasks.metrics import score
from tasks.prompts import ALPACA, PromptFormat, format_response


@torch.no_grad()
def response_loss(
    model: Any, examples: Sequence[TokenizedExample], pad_id: int, batch_size: int
) -> float | None:
    """Mean cross-entropy over all response tokens (token-weighted, not batch-weighted); None if none.

    Batches hold examples of similar length (sorted), so little of a batch is padding.
    """
    device = next(model.parameters()).device
    ordered = sorted(examples, key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        batch = collate(ordered[start : start + batch_size], pad_id)
        summed, tokens = response_cross_entropy(model, {k: v.to(device) for k, v in batch.items()})
        total += float(summed)
        count += tokens
    return total / count if count else None


def stop_token_ids(tokenizer: Any, prompt: PromptFormat) -> list[int]:
    """Tokens that end an answer: EOS, and the chat template's end-of-turn token when it differs."""
    stops = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if prompt.response_end:
        end = tokenizer(prompt.response_end, add_special_tokens=False)["input_ids"]
        if end and int(end[-1]) not in stops:
            stops.append(int(end[-1]))
    return stops


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    examples: Sequence[TokenizedExample],
    max_new_tokens: int,
    batch_size: int,
    prompt: PromptFormat = ALPACA,
) -> list[str]:
    """Greedy continuation of each example's (cut) prompt, decoded, up to an end token; in input order.

    Prompts go in batches of similar length (sorted), so little of a batch is left padding; decoding
    reuses the KV cache and a batch stops as soon as every row has produced an end token.
    """
    device = next(model.parameters()).device
    stops = stop_token_ids(tokenizer, prompt)
    order = sorted(range(len(examples)), key=lambda i: examples[i].prompt_length)
    texts = [""] * len(examples)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        enc = collate_prompts([examples[i] for i in chosen], tokenizer.pad_token_id)
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stops or None,
        )
        generated = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for index, text in zip(chosen, generated, strict=True):
            texts[index] = text
    return texts


def generation_score(
    metric: str, generations: Sequence[str], references: Sequence[str], labels: Sequence[str] = ()
) -> float | None:
    """Share of generations that answer their reference under ``metric``; None for zero examples."""
    if not references:
        return None
    hits = sum(score(metric, g, r, labels) for g, r in zip(generations, references, strict=True))
    return hits / len(references)


def exact_match(
    model: Any, tokenizer: Any, dataset: Any, max_new_tokens: int, batch_size: int, max_seq_len: int = 4096
) -> float | None:
    """Share of Alpaca prompts whose greedy continuation (up to EOS) equals the reference exactly."""
    rows = list(dataset)
    examples = tokenize_all(tokenizer, rows, max_seq_len)
    if len(examples) != len(rows):
        raise ValueError("some examples lost their whole response to max_seq_len; raise it")
    generations = generate_answers(model, tokenizer, examples, max_new_tokens, batch_size)
    return generation_score("exact", generations, [format_response(r) for r in rows])
