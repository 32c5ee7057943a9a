"""ClientApp: decode the global adapter, train locally, reply with the encoded delta.

The base model is loaded (and quantized) once per process and kept in ``_WORKERS``, keyed explicitly
by everything that changes the loaded model, so every round after the first only swaps LoRA factors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from pollen import protocol as P
from pollen.adapter import Adapter, flatten, subtract, unflatten
from pollen.codec import CodecError, WireSpec, decode, encode
from pollen.config import ConfigError, NodeConfig, RunConfig, parse_node_config, parse_run_config
from pollen.device import resolve_device
from pollen.downlink import apply_payload, load_view, store_view
from pollen.error_feedback import compensate, new_residual
from pollen.model import LoraHost, load_base_model, load_tokenizer
from pollen.training import train_steps
from tasks.batches import ExampleTokenizer, sample_batches
from tasks.data import DataError, node_data
from tasks.embedded import resolve_model_name
from tasks.evaluation import response_loss
from tasks.prompts import PromptFormatError, resolve_prompt_format

log = logging.getLogger("pollen")
app = ClientApp()

# context.state key of the error-feedback residual (what quantization dropped from the last delta).
RESIDUAL_STATE = "pollen-residual"
RESIDUAL_RANK_STATE = "pollen-residual-rank"  # ConfigRecord: the rank the residual belongs to


@dataclass
class Worker:
    """A loaded base model with its LoRA host and tokenizer (one per process and model setting)."""

    host: LoraHost
    tokenizer: Any
    device: torch.device

    def tokenizer_for(self, max_seq_len: int, prompt_format: str) -> ExampleTokenizer:
        """Tokenizes examples as the server does: same prompt format (task.prompt-format), same cut."""
        prompt = resolve_prompt_format(prompt_format, self.tokenizer)
        return ExampleTokenizer(self.tokenizer, max_seq_len, prompt)


_WORKERS: dict[tuple[Any, ...], Worker] = {}


def _worker(run: RunConfig, node: NodeConfig) -> Worker:
    path = resolve_model_name(run.model.name)
    device_name = node.device or run.model.device
    checkpointing = run.train.gradient_checkpointing
    key = (
        path,
        run.model.quantization,
        device_name,
        run.model.compute_dtype,
        run.lora,
        run.seed,
        checkpointing,
    )
    if key not in _WORKERS:
        base = load_base_model(path, run.model, device_override=node.device)
        _WORKERS[key] = Worker(
            host=LoraHost(base, run.lora, seed=run.seed, gradient_checkpointing=checkpointing),
            tokenizer=load_tokenizer(path),
            device=resolve_device(device_name),
        )
    return _WORKERS[key]


# Errors a node reports as their one line alone: bad input, not a bug, so no traceback.
_EXPECTED_ERRORS = (DataError, ConfigError, PromptFormatError, CodecError, FloatingPointError, ValueError)
Handler = Callable[[Message, Context], Message]


def one_line_errors(handler: Handler) -> Handler:
    """Reply to a failure with an error message of one line, ``Type: message``, that the server logs.

    Without this Flower sends the whole traceback as the reason, and a simulation prints it once per
    node and round. Unexpected exceptions still log their traceback here, on the node.
    """

    @functools.wraps(handler)
    def wrapped(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as exc:  # every failure becomes an error reply; the server decides what follows
            text = str(exc).strip().splitlines()
            line = f"{type(exc).__name__}: {text[0] if text else 'no message'}"
            if isinstance(exc, _EXPECTED_ERRORS):
                log.error("%s failed: %s", handler.__name__, line)
            else:
                log.exception("%s failed: %s", handler.__name__, line)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=line), reply_to=message)

    return wrapped


def _configs(context: Context) -> tuple[RunConfig, NodeConfig]:
    return parse_run_config(context.run_config), parse_node_config(context.node_config)


def _check_instruction(message: Message, worker: Worker, node: NodeConfig) -> tuple[ConfigRecord, int]:
    """The round's config and rank, after checking this node can take part."""
    config = message.content.config_records[P.CONFIG]
    rank = P.config_int(config, P.RANK)
    if config.get(P.FINGERPRINT) != worker.host.fingerprint:
        raise ValueError(
            f"the server's base model (fingerprint {config.get(P.FINGERPRINT)!r}) differs from this node's "
            f"({worker.host.fingerprint}); load the same base model as the federation"
        )
    if node.lora_rank and node.lora_rank != rank:
        raise ValueError(
            f"this node is configured for lora-rank={node.lora_rank} but the server sent rank {rank}; "
            "the server's strategy must support per-node ranks (strategy.name)"
        )
    return config, rank


@app.query()
@one_line_errors
def handshake(message: Message, context: Context) -> Message:
    """Tell the server what this node is: its rank, partition, base model and device."""
    run, node = _configs(context)
    worker = _worker(run, node)
    info = ConfigRecord(
        {
            P.RANK: node.lora_rank,
            P.PARTITION_ID: node.partition_id,
            P.NUM_PARTITIONS: node.num_partitions,
            P.OWN_DATA: bool(node.data_path),
            P.FINGERPRINT: worker.host.fingerprint,
            P.QUANTIZATION: run.model.quantization,
            P.DEVICE: str(worker.device),
        }
    )
    return Message(content=RecordDict({P.META: info}), reply_to=message)


@app.train()
@one_line_errors
def train(message: Message, context: Context) -> Message:
    """One round of local training; replies with the (optionally quantized) delta of the factors."""
    run, node = _configs(context)
    worker = _worker(run, node)
    config, rank = _check_instruction(message, worker, node)
    received = _receive(message, context, config, rank, run.lora.alpha)

    slot = worker.host.activate(rank)
    worker.host.write(received)
    train_a = bool(config.get(P.TRAIN_A, True))
    train_set, _ = node_data(run.task, node.partition_id, node.num_partitions, run.seed, node.data_path)
    tokenize = worker.tokenizer_for(P.config_int(config, P.MAX_SEQ_LEN), run.task.prompt_format)
    tokenized = [tokenize(example) for example in train_set]
    examples = [e for e in tokenized if e.has_response]
    server_round = P.config_int(config, P.ROUND)
    seed = run.seed * 100_003 + server_round * 1_009 + node.partition_id
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # LoRA dropout draws from the global generator: same seed, same run
    batches = sample_batches(
        examples, P.config_int(config, P.BATCH_SIZE), worker.tokenizer.pad_token_id, generator
    )
    result = train_steps(
        worker.host.model,
        worker.host.trainable_parameters(include_a=train_a),
        batches,
        steps=P.config_int(config, P.LOCAL_STEPS),
        lr=P.config_number(config, P.LR),
        device=worker.device,
    )
    delta = flatten(subtract(worker.host.read(), received))
    if not train_a:  # A stayed frozen: its delta is zero and is not sent
        delta = {name: tensor for name, tensor in delta.items() if not name.endswith(".A")}

    spec = WireSpec(
        bits=P.config_int(config, P.UPLINK_BITS),
        scheme=str(config[P.UPLINK_SCHEME]),
        block_size=P.config_int(config, P.BLOCK_SIZE),
    )
    use_feedback = bool(config[P.ERROR_FEEDBACK]) and spec.bits < 32
    residual = _load_residual(context, rank) if use_feedback else None
    to_send = compensate(delta, residual)
    record = encode(to_send, spec, generator)
    if use_feedback:
        _store_residual(context, rank, new_residual(to_send, decode(record)))

    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: len(examples),
            P.NUM_PROMPT_CUT: sum(e.prompt_cut > 0 for e in tokenized),
            P.TRAIN_LOSS: result.mean_loss,
            P.TRAIN_SECONDS: result.seconds,
            P.PEAK_RSS_MB: peak_rss_mb(),
        }
    )
    meta = ConfigRecord(
        {
            P.RANK: rank,
            P.LORA_SCALE: slot.scale,
            P.FINGERPRINT: worker.host.fingerprint,
            P.QUANTIZATION: run.model.quantization,
        }
    )
    content = RecordDict({P.DELTA: record, P.METRICS: metrics, P.META: meta})
    return Message(content=content, reply_to=message)


@app.evaluate()
@one_line_errors
def evaluate(message: Message, context: Context) -> Message:
    """Loss of the received global adapter on this node's held-back examples."""
    run, node = _configs(context)
    worker = _worker(run, node)
    config, rank = _check_instruction(message, worker, node)
    received = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=run.lora.alpha / rank)
    worker.host.activate(rank)
    worker.host.write(received)
    _, local_eval = node_data(run.task, node.partition_id, node.num_partitions, run.seed, node.data_path)
    tokenize = worker.tokenizer_for(P.config_int(config, P.MAX_SEQ_LEN), run.task.prompt_format)
    examples = [e for e in map(tokenize, local_eval) if e.has_response]
    loss = response_loss(
        worker.host.model, examples, worker.tokenizer.pad_token_id, P.config_int(config, P.BATCH_SIZE)
    )
    # No examples, no loss: a weight of 0 tells the server to leave this node out of the mean.
    figures: dict[str, int | float] = {P.NUM_EXAMPLES: 0}
    if loss is not None:
        figures = {P.NUM_EXAMPLES: len(examples), P.EVAL_LOSS: loss}
    metrics = MetricRecord(dict(figures))
    return Message(content=RecordDict({P.METRICS: metrics}), reply_to=message)


def _receive(message: Message, context: Context, config: ConfigRecord, rank: int, alpha: float) -> Adapter:
    """The global adapter at this node's rank: decoded whole, or as a change to the view kept in state."""
    scale = alpha / rank
    held = load_view(context.state, scale) if P.DOWNLINK_VERSION in config else None
    adapter, view = apply_payload(message.content.array_records[P.ADAPTER], config, scale, held)
    if view is not None:
        store_view(context.state, view)
    return adapter


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _load_residual(context: Context, rank: int) -> dict[str, torch.Tensor] | None:
    """Last round's quantization residual, if it was made at the same rank (else it no longer applies)."""
    record = context.state.array_records.get(RESIDUAL_STATE)
    meta = context.state.config_records.get(RESIDUAL_RANK_STATE)
    if record is None or meta is None or meta.get(P.RANK) != rank:
        return None
    return dict(record.to_torch_state_dict())


def _store_residual(context: Context, rank: int, residual: dict[str, torch.Tensor]) -> None:
    context.state[RESIDUAL_STATE] = ArrayRecord({k: v.contiguous() for k, v in residual.items()})
    context.state[RESIDUAL_RANK_STATE] = ConfigRecord({P.RANK: rank})
