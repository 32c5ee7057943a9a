"""ClientApp: decode the global adapter, train locally, reply with the encoded delta.

Thin glue around client_app/worker.py: train and evaluate parse the message's knobs once
(:func:`pollen.protocol.parse_round_knobs`), take the process's worker, receive the adapter, call the
worker module, and encode the reply. The base model is loaded (and quantized) once per process
and kept in ``_WORKERS``, keyed explicitly by everything that changes the loaded model
(:func:`client_app.worker.worker_key`), so every round after the first only swaps LoRA factors.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from client_app.worker import Worker, load_worker, score_round, train_round, worker_key
from pollen import protocol as P
from pollen.adapter import Adapter, unflatten
from pollen.codec import CodecError, WireSpec, decode, encode
from pollen.config import ConfigError, NodeConfig, RunConfig, parse_node_config, parse_run_config
from pollen.downlink import apply_payload, load_view, store_view
from pollen.error_feedback import compensate, new_residual
from pollen.protocol import RoundKnobs
from tasks.data import DataError, node_data
from tasks.prompts import PromptFormatError

log = logging.getLogger("pollen")
app = ClientApp()

# context.state key of the error-feedback residual (what quantization dropped from the last delta).
RESIDUAL_STATE = "pollen-residual"
RESIDUAL_RANK_STATE = "pollen-residual-rank"  # ConfigRecord: the rank the residual belongs to

_WORKERS: dict[tuple[object, ...], Worker] = {}


def _worker(run: RunConfig, node: NodeConfig) -> Worker:
    key = worker_key(run, node.device)
    if key not in _WORKERS:
        _WORKERS[key] = load_worker(run, node.device)
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


def _instruction(message: Message, worker: Worker, node: NodeConfig) -> tuple[ConfigRecord, RoundKnobs]:
    """The message's config and its parsed knobs, after checking this node can take part."""
    config = message.content.config_records[P.CONFIG]
    knobs = P.parse_round_knobs(config)
    if config.get(P.FINGERPRINT) != worker.host.fingerprint:
        raise ValueError(
            f"the server's base model (fingerprint {config.get(P.FINGERPRINT)!r}) differs from this node's "
            f"({worker.host.fingerprint}); load the same base model as the federation"
        )
    if node.lora_rank and node.lora_rank != knobs.rank:
        raise ValueError(
            f"this node is configured for lora-rank={node.lora_rank} but the server sent rank {knobs.rank}; "
            "the server's strategy must support per-node ranks (strategy.name)"
        )
    return config, knobs


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
    config, knobs = _instruction(message, worker, node)
    received = _receive(message, context, config, knobs.rank, run.lora.alpha)
    train_set, _ = node_data(run.task, node.partition_id, node.num_partitions, run.seed, node.data_path)
    done = train_round(worker, received, knobs, train_set, node.partition_id, run.task.prompt_format)

    spec = WireSpec(bits=knobs.uplink_bits, scheme=knobs.uplink_scheme, block_size=knobs.block_size)
    use_feedback = knobs.error_feedback and spec.bits < 32
    residual = _load_residual(context, knobs.rank) if use_feedback else None
    to_send = compensate(done.delta, residual)
    record = encode(to_send, spec, done.generator)
    if use_feedback:
        _store_residual(context, knobs.rank, new_residual(to_send, decode(record)))

    metrics = MetricRecord(
        {
            P.NUM_EXAMPLES: done.num_examples,
            P.NUM_PROMPT_CUT: done.num_prompt_cut,
            P.TRAIN_LOSS: done.train.mean_loss,
            P.TRAIN_SECONDS: done.train.seconds,
            P.PEAK_RSS_MB: peak_rss_mb(),
        }
    )
    meta = ConfigRecord(
        {
            P.RANK: knobs.rank,
            P.LORA_SCALE: run.lora.alpha / knobs.rank,  # the trained slot's scale (LoraHost.activate)
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
    _, knobs = _instruction(message, worker, node)
    received = unflatten(decode(message.content.array_records[P.ADAPTER]), scale=run.lora.alpha / knobs.rank)
    _, local_eval = node_data(run.task, node.partition_id, node.num_partitions, run.seed, node.data_path)
    loss, count = score_round(worker, received, knobs, local_eval, run.task.prompt_format)
    # No examples, no loss: a weight of 0 tells the server to leave this node out of the mean.
    figures: dict[str, int | float] = {P.NUM_EXAMPLES: 0}
    if loss is not None:
        figures = {P.NUM_EXAMPLES: count, P.EVAL_LOSS: loss}
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
