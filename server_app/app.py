"""ServerApp: check the configuration, run the federated rounds, evaluate, write the run folder."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from pollen import protocol as P
from pollen.codec import WireSpec
from pollen.config import ConfigError, RunConfig, parse_run_config
from pollen.model import LoraHost, check_model_available, load_base_model, load_tokenizer
from pollen.schedule import round_lr
from server_app.artifacts import CHECKPOINT_DIR, RunFolder, check_run_folder_free, run_folder_path
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_round,
    load_checkpoint,
    save_checkpoint,
)
from server_app.evaluation import Evaluator, load_global
from server_app.nodes import NodeDirectory
from server_app.rounds import progress_line, run_round
from strategies.base import LoraStrategy, StrategySettings, adapter_to_record
from strategies.registry import build_strategy
from tasks.batches import tokenize_all
from tasks.data import DataError, check_data_source, held_out, load_pool_and_eval
from tasks.embedded import resolve_model_name

log = logging.getLogger("pollen")
app = ServerApp()


def _setup_logging() -> None:
    """Pollen's progress lines go to stdout, which Flower streams to `flwr run --stream`."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(levelname)s pollen: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def preflight(run_config: dict[str, Any]) -> tuple[RunConfig, str]:
    """Every check that can fail on user input, before anything is written or trained.

    Returns the parsed config and the base model's loadable path; raises ConfigError with one
    line per problem.
    """
    cfg = parse_run_config(run_config)
    problems: list[str] = []
    model_path = ""
    try:
        model_path = resolve_model_name(cfg.model.name)
        check_model_available(model_path)
    except (FileNotFoundError, OSError) as exc:
        problems.append(str(exc))
    try:
        check_data_source(cfg.task)
        load_pool_and_eval(cfg.task, cfg.seed)
    except DataError as exc:
        problems.append(str(exc))
    run_dir = run_folder_path(cfg.output.dir, cfg.output.run_name)
    try:
        if not cfg.output.resume:
            check_run_folder_free(run_dir)
        elif checkpoint_round(run_dir / CHECKPOINT_DIR) is None:
            problems.append(
                f"output.resume=true but {run_dir} holds no checkpoint; start it with output.resume=false"
            )
    except (FileExistsError, CheckpointError) as exc:
        problems.append(str(exc))
    if problems:
        raise ConfigError(problems)
    return cfg, model_path


def train_config(cfg: RunConfig, server_round: int) -> ConfigRecord:
    """The knobs every node receives with its adapter in ``server_round``, its learning rate scheduled."""
    t = cfg.train
    return ConfigRecord(
        {
            P.LOCAL_STEPS: t.local_steps,
            P.LR: round_lr(t.lr_schedule, t.lr, t.lr_min, server_round, cfg.num_server_rounds),
            P.BATCH_SIZE: t.batch_size,
            P.MAX_SEQ_LEN: t.max_seq_len,
            P.SEED: cfg.seed,
            P.UPLINK_BITS: cfg.wire.uplink_bits,
            P.UPLINK_SCHEME: cfg.wire.scheme,
            P.BLOCK_SIZE: cfg.wire.block_size,
            P.ERROR_FEEDBACK: cfg.wire.error_feedback,
        }
    )


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of federated LoRA fine-tuning."""
    _setup_logging()
    try:
        cfg, model_path = preflight(dict(context.run_config))
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("config: %s", problem)
        raise SystemExit(2) from None

    folder = RunFolder(run_folder_path(cfg.output.dir, cfg.output.run_name))
    log.info("loading base model %s (%s)", cfg.model.name, cfg.model.quantization)
    host = LoraHost(load_base_model(model_path, cfg.model), cfg.lora, seed=cfg.seed)
    tokenizer = load_tokenizer(model_path)
    eval_set = held_out(cfg.task, cfg.seed)
    examples = tokenize_all(tokenizer, eval_set, cfg.train.max_seq_len)
    evaluate = Evaluator(host, tokenizer, eval_set, examples, cfg.task.max_new_tokens)
    strategy = build_strategy(cfg.strategy.name, strategy_settings(cfg, host.fingerprint))
    nodes = NodeDirectory(host.fingerprint, cfg.strategy.rank_plan, cfg.lora.rank)
    wait_for_nodes(grid, cfg.strategy.min_nodes, cfg.strategy.round_timeout)
    nodes.discover(grid, timeout=cfg.strategy.round_timeout)
    admit(strategy, nodes)

    meta = {"fingerprint": host.fingerprint, "strategy": cfg.strategy.name}
    rows: list[dict[str, Any]] = []
    if cfg.output.resume:
        checkpoint = load_checkpoint(folder.path / CHECKPOINT_DIR, require=meta)
        global_record = ArrayRecord(dict(checkpoint.adapter))
        rows = list(checkpoint.metrics)
        folder.rewrite_metrics(rows)  # drops any line of a round that was in flight
        log.info("resuming %s after round %d", folder.path, checkpoint.round)
    else:
        global_rank = strategy.global_rank(sorted(set(strategy.node_ranks.values())))
        host.activate(global_rank)
        global_record = adapter_to_record(strategy.initial_global(host.read()))
        folder.create({"run_config": cfg.to_dict(), "base_model_path": model_path, **meta})
        log.info("run folder %s", folder.path)
        base_loss, base_match = evaluate(global_record)
        log.info("round 0 (base + initial adapter): eval_loss %.4f | exact_match %.3f", base_loss, base_match)
    strategy.summary()

    for server_round in range(len(rows) + 1, cfg.num_server_rounds + 1):
        started = time.perf_counter()
        if nodes.discover(grid, timeout=cfg.strategy.round_timeout):
            admit(strategy, nodes)
        global_record, row = run_round(
            grid,
            strategy,
            server_round,
            global_record,
            train_config(cfg, server_round),
            cfg.strategy.round_timeout,
        )
        loss, match = evaluate(global_record)
        row.update(eval_loss=loss, exact_match=match, round_seconds=time.perf_counter() - started)
        rows.append(row)
        folder.append_metrics(row)
        save_checkpoint(
            folder.path / CHECKPOINT_DIR,
            Checkpoint(
                round=server_round, adapter=dict(global_record.to_torch_state_dict()), metrics=rows, meta=meta
            ),
        )
        log.info(progress_line(row, cfg.num_server_rounds))

    load_global(host, global_record)
    adapter_dir = folder.save_adapter(
        host.model.peft_config[host.active.name] if host.active else None,
        _peft_state(host),
        base_model_path=model_path,
    )
    log.info("final adapter written to %s", adapter_dir)


def strategy_settings(cfg: RunConfig, fingerprint: str) -> StrategySettings:
    """The strategy's view of the run config."""
    return StrategySettings(
        fraction_train=cfg.strategy.fraction_train,
        fraction_evaluate=cfg.strategy.fraction_evaluate,
        min_nodes=cfg.strategy.min_nodes,
        alpha=cfg.lora.alpha,
        global_rank=cfg.lora.rank,
        fingerprint=fingerprint,
        downlink=WireSpec(
            bits=cfg.wire.downlink_bits, scheme=cfg.wire.scheme, block_size=cfg.wire.block_size
        ),
        seed=cfg.seed,
        wait_seconds=cfg.strategy.round_timeout,
        norm_weighted=cfg.strategy.norm_weighted,
        ffa_lr_multiplier=cfg.strategy.ffa_lr_multiplier,
        downlink_feedback=cfg.wire.error_feedback,
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` nodes are connected (bounded by ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"fewer than strategy.min-nodes={count} nodes connected within {timeout:.0f} s"
            )
        time.sleep(1.0)


def admit(strategy: LoraStrategy, nodes: NodeDirectory) -> None:
    """Tell the strategy which nodes it may sample, at which rank, in which (partition) order."""
    strategy.node_ranks = eligible_ranks(strategy, nodes)
    strategy.node_keys = {node_id: info.partition_id for node_id, info in nodes.infos.items()}


def eligible_ranks(strategy: LoraStrategy, nodes: NodeDirectory) -> dict[int, int]:
    """Node ranks the strategy can serve; equal-rank strategies leave other ranks out (logged)."""
    if strategy.name != "fedavg":
        return dict(nodes.ranks)
    rank = strategy.settings.global_rank
    for node_id, node_rank in nodes.ranks.items():
        if node_rank != rank:
            log.warning(
                "node %d trains rank %d; fedavg needs rank %d, so it is left out", node_id, node_rank, rank
            )
    return {n: r for n, r in nodes.ranks.items() if r == rank}


def _peft_state(host: LoraHost) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    if host.active is None:
        raise RuntimeError("no active adapter to save")
    return dict(get_peft_model_state_dict(host.model, adapter_name=host.active.name))
