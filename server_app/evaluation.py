"""Central evaluation of the global adapter on the server's held-out examples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from pollen.adapter import with_scale
from pollen.model import LoraHost
from strategies.base import adapter_from_record
from tasks.evaluation import exact_match, response_loss

EVAL_BATCH_SIZE = 32


def load_global(host: LoraHost, global_record: ArrayRecord) -> None:
    """Make the global adapter the host's active one (at its rank, rescaled to PEFT's alpha / rank)."""
    adapter = adapter_from_record(global_record)
    host.activate(next(iter(adapter.values())).rank)
    host.write(with_scale(adapter, host.lora.alpha))


@dataclass
class Evaluator:
    """Central evaluation of the global adapter on the server's held-out examples."""

    host: LoraHost
    tokenizer: Any
    dataset: Any
    examples: list[Any]
    max_new_tokens: int

    def __call__(self, global_record: ArrayRecord) -> tuple[float, float]:
        """(response-token loss, exact match) of the global adapter, whatever its rank and scale."""
        load_global(self.host, global_record)
        model = self.host.model
        loss = response_loss(model, self.examples, self.tokenizer.pad_token_id, EVAL_BATCH_SIZE)
        match = exact_match(model, self.tokenizer, self.dataset, self.max_new_tokens, EVAL_BATCH_SIZE)
        return loss, match
