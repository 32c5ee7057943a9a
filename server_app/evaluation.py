"""Central evaluation of the global adapter on the server's held-out examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from pollen.model import LoraHost
from strategies.base import adapter_from_record
from tasks.evaluation import exact_match, response_loss

EVAL_BATCH_SIZE = 32


@dataclass
class Evaluator:
    """Central evaluation of the global adapter on the server's held-out examples."""

    host: LoraHost
    tokenizer: Any
    dataset: Any
    examples: list[Any]
    max_new_tokens: int

    def __call__(self, global_record: ArrayRecord, rank: int, alpha: float) -> tuple[float, float]:
        """(response-token loss, exact match) of the global adapter at ``rank``."""
        self.host.activate(rank)
        self.host.write(adapter_from_record(global_record, scale=alpha / rank))
        model = self.host.model
        loss = response_loss(model, self.examples, self.tokenizer.pad_token_id, EVAL_BATCH_SIZE)
        match = exact_match(model, self.tokenizer, self.dataset, self.max_new_tokens, EVAL_BATCH_SIZE)
        return loss, match
