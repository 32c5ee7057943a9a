"""A node's work without Flower: load its worker, train one round, score its held-back examples.

The ClientApp (client_app/app.py) is the glue around these functions, and the benchmarks call them
too, so what a benchmark measures is the node as shipped. The round's knobs come from the server's
message (:class:`pollen.protocol.RoundKnobs`); the run config only builds the worker and the data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from pollen.adapter import Adapter, flatten, subtract
from pollen.config import RunConfig
from pollen.cpu_memory import return_freed_heap
from pollen.device import resolve_device
from pollen.model import LoraHost, load_base_model, load_tokenizer
from pollen.protocol import RoundKnobs
from pollen.training import TrainResult, train_steps
from tasks.batches import ExampleTokenizer, TokenizedExample, sample_batches
from tasks.embedded import resolve_model_name
from tasks.evaluation import response_loss
from tasks.prompts import resolve_prompt_format

Rows = Iterable[Mapping[str, Any]]  # Alpaca-style examples: a datasets.Dataset or a list of dicts


@dataclass
class Worker:
    """A loaded base model with its LoRA host and tokenizer (one per process and model setting)."""

    host: LoraHost
    tokenizer: Any
    device: torch.device
    micro_batch_size: int = 0  # train.micro-batch-size: rows per forward/backward pass (0 = whole batch)

    def tokenizer_for(self, max_seq_len: int, prompt_format: str) -> ExampleTokenizer:
        """Tokenizes examples as the server does: same prompt format (task.prompt-format), same cut."""
        return example_tokenizer(self.tokenizer, max_seq_len, prompt_format)


def example_tokenizer(tokenizer: Any, max_seq_len: int, prompt_format: str) -> ExampleTokenizer:
    """The node's tokenization for ``tokenizer``: task.prompt-format resolved, cut to ``max_seq_len``."""
    return ExampleTokenizer(tokenizer, max_seq_len, resolve_prompt_format(prompt_format, tokenizer))


def worker_key(run: RunConfig, device_override: str = "") -> tuple[Any, ...]:
    """Everything that changes what :func:`load_worker` loads: the key of a per-process worker cache."""
    return (
        resolve_model_name(run.model.name),
        run.model.quantization,
        device_override or run.model.device,
        run.model.compute_dtype,
        run.lora,
        run.seed,  # seeds the fresh adapters LoraHost creates
        run.train.gradient_checkpointing,
        run.train.micro_batch_size,
    )


def load_worker(run: RunConfig, device_override: str = "") -> Worker:
    """Load (and quantize) the run's base model, on the node's device when it names one."""
    path = resolve_model_name(run.model.name)
    compact = run.train.gradient_checkpointing  # memory over time: keep the heap compact as well
    base = load_base_model(path, run.model, device_override=device_override, compact_heap=compact)
    return worker_on(base, run, device_override)


def worker_on(base: torch.nn.Module, run: RunConfig, device_override: str = "") -> Worker:
    """A worker around an already loaded base model (a benchmark reads the bare base's footprint first)."""
    checkpointing = run.train.gradient_checkpointing
    return Worker(
        host=LoraHost(base, run.lora, seed=run.seed, gradient_checkpointing=checkpointing),
        tokenizer=load_tokenizer(resolve_model_name(run.model.name)),
        device=resolve_device(device_override or run.model.device),
        micro_batch_size=run.train.micro_batch_size,
    )


def node_seed(seed: int, server_round: int, partition_id: int) -> int:
    """The seed of one node's round: its batch order, LoRA dropout and the uplink's stochastic rounding."""
    return seed * 100_003 + server_round * 1_009 + partition_id


@dataclass(frozen=True)
class RoundResult:
    """What one node's local training produced, ready for error feedback and encoding."""

    delta: dict[str, torch.Tensor]  # flat trained-minus-received factors; no ".A" entries if train_a is off
    num_examples: int  # training examples with a response token (the update's weight)
    num_prompt_cut: int  # training examples that lost prompt tokens to max-seq-len
    train: TrainResult
    generator: torch.Generator  # the round's generator, past the batch draws: the uplink rounds with it


def train_round(
    worker: Worker,
    received: Adapter,
    knobs: RoundKnobs,
    rows: Rows,
    partition_id: int,
    prompt_format: str,
    on_batch: Callable[[], None] | None = None,
) -> RoundResult:
    """Train ``received`` (at ``knobs.rank``) on ``rows`` for one round, seeded by run, round, partition."""
    seed = node_seed(knobs.seed, knobs.server_round, partition_id)
    return train_from(worker, received, knobs, rows, seed, prompt_format, on_batch)


def train_from(
    worker: Worker,
    start: Adapter,
    knobs: RoundKnobs,
    rows: Rows,
    seed: int,
    prompt_format: str,
    on_batch: Callable[[], None] | None = None,
) -> RoundResult:
    """:func:`train_round` with the seed given; benchmark baselines pick their own.

    ``on_batch`` is called as each step asks for its batch (a benchmark times the steps with it).
    """
    worker.host.activate(knobs.rank)
    worker.host.write(start)
    tokenized = tokenize_rows(worker, rows, knobs.max_seq_len, prompt_format)
    examples = [e for e in tokenized if e.has_response]
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator: same seed, same run
    batches = sample_batches(examples, knobs.batch_size, worker.tokenizer.pad_token_id, generator)
    result = train_steps(
        worker.host.model,
        worker.host.trainable_parameters(include_a=knobs.train_a),
        batches if on_batch is None else _announced(batches, on_batch),
        steps=knobs.local_steps,
        lr=knobs.lr,
        device=worker.device,
        micro_batch_size=worker.micro_batch_size,
    )
    return_freed_heap()  # the steps' activations, before the update is encoded and sent
    delta = flatten(subtract(worker.host.read(), start))
    if not knobs.train_a:  # A stayed frozen: its delta is zero and is not sent
        delta = {name: tensor for name, tensor in delta.items() if not name.endswith(".A")}
    return RoundResult(
        delta=delta,
        num_examples=len(examples),
        num_prompt_cut=sum(e.prompt_cut > 0 for e in tokenized),
        train=result,
        generator=generator,
    )


def score_round(
    worker: Worker, received: Adapter, knobs: RoundKnobs, rows: Rows, prompt_format: str
) -> tuple[float | None, int]:
    """(response-token loss, examples scored) of ``received`` on ``rows``; loss None when there are none."""
    worker.host.activate(knobs.rank)
    worker.host.write(received)
    examples = [e for e in tokenize_rows(worker, rows, knobs.max_seq_len, prompt_format) if e.has_response]
    loss = response_loss(worker.host.model, examples, worker.tokenizer.pad_token_id, knobs.batch_size)
    return_freed_heap()
    return loss, (len(examples) if loss is not None else 0)


def tokenize_rows(worker: Worker, rows: Rows, max_seq_len: int, prompt_format: str) -> list[TokenizedExample]:
    """Every row tokenized as the node trains on it (those whose response was cut away included)."""
    return list(map(worker.tokenizer_for(max_seq_len, prompt_format), rows))


def _announced(
    batches: Iterator[dict[str, torch.Tensor]], on_batch: Callable[[], None]
) -> Iterator[dict[str, torch.Tensor]]:
    """``batches``, calling ``on_batch`` before each one is drawn."""
    while True:
        on_batch()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch
