"""Central evaluation of the global adapter on the server's held-out examples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pollen.adapter import Adapter, with_scale
from pollen.model import LoraHost
from tasks.batches import TokenizedExample
from tasks.evaluation import generate_answers, generation_score, response_loss
from tasks.metrics import FIGURE_NAMES
from tasks.prompts import ALPACA, PromptFormat

EVAL_BATCH_SIZE = 32


def load_global(host: LoraHost, adapter: Adapter) -> None:
    """Make the global adapter the host's active one (at its rank, rescaled to PEFT's alpha / rank)."""
    host.activate(next(iter(adapter.values())).rank)
    host.write(with_scale(adapter, host.lora.alpha))


@dataclass
class Evaluator:
    """Central evaluation of the global adapter: response loss, and the task's metric on generations.

    ``examples`` and ``references`` are aligned (one tokenized held-out example per reference output);
    ``metric`` is the resolved ``task.metric`` (``loss`` generates nothing).
    """

    host: LoraHost
    tokenizer: Any
    examples: list[TokenizedExample]
    references: Sequence[str]
    metric: str
    max_new_tokens: int
    labels: Sequence[str] = ()
    prompt: PromptFormat = ALPACA

    def figure_name(self) -> str | None:
        """The metrics.jsonl key of the metric's figure (None for ``loss``)."""
        return FIGURE_NAMES.get(self.metric)

    def __call__(self, global_adapter: Adapter) -> dict[str, float | None]:
        """``eval_loss`` and the metric's figure of the global adapter; None where there are no examples."""
        load_global(self.host, global_adapter)
        model = self.host.model
        result: dict[str, float | None] = {
            "eval_loss": response_loss(model, self.examples, self.tokenizer.pad_token_id, EVAL_BATCH_SIZE)
        }
        name = self.figure_name()
        if name is not None:
            answers = generate_answers(
                model, self.tokenizer, self.examples, self.max_new_tokens, EVAL_BATCH_SIZE, self.prompt
            )
            result[name] = generation_score(self.metric, answers, self.references, self.labels)
        return result
