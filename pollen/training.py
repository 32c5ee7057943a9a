"""The local training loop: a fixed number of AdamW steps on the active LoRA adapter."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch


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
) -> TrainResult:
    """Run ``steps`` optimizer steps; the optimizer is fresh each call (rounds are independent).

    Raises FloatingPointError on a non-finite loss, so a diverging node fails loudly instead of
    sending NaN factors to the server.
    """
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        batch = {k: v.to(device) for k, v in next(batches).items()}
        loss = model(**batch).loss
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step + 1}; lower train.lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return TrainResult(mean_loss=sum(losses) / len(losses), steps=steps, seconds=time.perf_counter() - start)
