"""The local training loop: a fixed number of AdamW steps on the active LoRA adapter.

The loss covers response tokens only, and the model computes logits only at the positions that predict
one (``logits_to_keep``): a prompt position costs no full-vocabulary row of logits, nor its float32 copy
and gradient, which for a real vocabulary (49k for SmolLM2) is most of a step's activation memory.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding positions)


def response_cross_entropy(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the batch's response tokens, their count), logits only where needed.

    Token t+1 is predicted at position t; only positions whose next token is a response token in
    some row of the batch get logits. Models whose forward has no ``logits_to_keep`` get full logits.
    """
    targets = batch["labels"][:, 1:]  # (batch, seq-1): the token each position predicts
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)  # (kept,) positions
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, logits_to_keep=keep).logits  # (batch, kept, vocab)
        picked = targets[:, keep]  # (batch, kept)
    except TypeError:  # an architecture without logits_to_keep
        logits = model(**inputs).logits[:, :-1, :]  # (batch, seq-1, vocab)
        picked = targets
    loss = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        picked.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((picked != IGNORE_INDEX).sum())


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float  # mean training loss over the steps taken
    steps: int
    seconds: float


def train_steps(
    model: torch.nn.Module,
    parameters: list[torch.nn.Parameter],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
    device: torch.device,
    micro_batch_size: int = 0,
) -> TrainResult:
    """Run ``steps`` optimizer steps; the optimizer is fresh each call (rounds are independent).

    ``micro_batch_size`` > 0 runs each batch's forward and backward passes that many rows at a time and
    sums their gradients, so a step holds the activations of one micro-batch only; the step's loss and
    gradient are the whole batch's (token-weighted), as without it. Raises FloatingPointError on a
    non-finite loss, so a diverging node fails loudly instead of sending NaN factors to the server.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    try:
        for step in range(steps):
            batch = {k: v.to(device) for k, v in next(batches).items()}
            loss = _accumulate_gradients(model, batch, micro_batch_size)
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {step + 1}; lower train.lr")
            torch.nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
    finally:
        model.eval()  # also after a failed step: scoring never runs with dropout on
    return TrainResult(mean_loss=sum(losses) / len(losses), steps=steps, seconds=time.perf_counter() - start)


def micro_batches(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """``batch`` cut into consecutive row slices of ``size`` rows (the whole batch when ``size`` <= 0)."""
    rows = batch["input_ids"].shape[0]
    if size <= 0 or size >= rows:
        return [batch]
    return [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, rows, size)]


def _accumulate_gradients(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], micro_batch_size: int
) -> float:
    """Backpropagate the batch's mean response-token loss, one micro-batch at a time; returns the loss.

    Each micro-batch's summed loss is divided by the whole batch's response-token count, so the summed
    gradients equal those of the batch in one pass (a micro-batch without response tokens is skipped).
    """
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    total = 0.0
    for part in micro_batches(batch, micro_batch_size):
        if not (part["labels"][:, 1:] != IGNORE_INDEX).any():
            continue
        summed, _ = response_cross_entropy(model, part)
        (summed / max(tokens, 1)).backward()
        total += float(summed.detach())
    return total / max(tokens, 1)
