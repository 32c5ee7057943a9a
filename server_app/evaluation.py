"""Central evaluation of the global adapter on the server's held-out examples."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pollen.adapter import Adapter, with_scale
from pollen.cpu_memory import return_freed_heap
from pollen.model import LoraHost
from tasks.batches import TokenizedExample
from tasks.evaluation import generate_answers, generation_score, response_loss
from tasks.metrics import FIGURE_NAMES
from tasks.prompts import ALPACA, PromptFormat

# Held-out examples per forward pass: a smaller batch holds fewer activations beside the training that
# runs while the server evaluates (eval.background); on the CPU 16 was also faster than 32 in a hand timing.
EVAL_BATCH_SIZE = 16


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
        return_freed_heap()  # the evaluation's batches, while the next round trains
        return result


def awaiting_evaluation(row: dict[str, Any]) -> bool:
    """A row of a round due for evaluation whose figures are not in yet (still running, or cut off)."""
    return bool(row.get("evaluated")) and "eval_seconds" not in row


def evaluated_round(server_round: int, every: int, last_round: int) -> bool:
    """Whether ``server_round`` is evaluated under ``eval.every``: round 0, every k-th, and the last."""
    return server_round in (0, last_round) or server_round % every == 0


class EvaluationSlot:
    """Runs one evaluation at a time, in a thread (``background``) or at once, and fills its row.

    The ServerApp starts round r's evaluation and goes on to train round r+1; waiting for it before the
    next one starts keeps at most one evaluation (and its activations) in flight. An error raised by an
    evaluation in the thread is raised again by :meth:`wait`.
    """

    def __init__(self, evaluate: Callable[[Adapter], dict[str, Any]], background: bool) -> None:
        self._evaluate = evaluate
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pollen-eval") if background else None
        self._pending: Future[None] | None = None

    def start(self, row: dict[str, Any], adapter: Adapter) -> None:
        """Evaluate ``adapter`` into ``row`` (its figures and ``eval_seconds``); waits for the one before."""
        self.wait()
        if self._pool is None:
            self._fill(row, adapter)
        else:
            self._pending = self._pool.submit(self._fill, row, adapter)

    def wait(self) -> float:
        """Block until the evaluation in flight (if any) has filled its row; the seconds spent waiting."""
        if self._pending is None:
            return 0.0
        started = time.perf_counter()
        pending, self._pending = self._pending, None
        pending.result()
        return time.perf_counter() - started

    def close(self) -> None:
        """Let the thread go once its evaluation (if any) is done."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _fill(self, row: dict[str, Any], adapter: Adapter) -> None:
        started = time.perf_counter()
        row.update(self._evaluate(adapter))
        row["eval_seconds"] = time.perf_counter() - started
