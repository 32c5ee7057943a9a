"""ServerApp: check the configuration, run the federated rounds, evaluate, write the run folder."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from typing import Any, NoReturn

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from pollen import protocol as P
from pollen.adapter import Adapter, sorted_modules
from pollen.codec import WireSpec
from pollen.config import ConfigError, RunConfig
from pollen.model import (
    LoraHost,
    load_base_model,
)
from pollen.targets import TargetModulesError
from server_app.artifacts import CHECKPOINT_DIR, RunFolder, run_folder_path
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_fits,
    expected_keys,
    save_checkpoint,
)
from server_app.evaluation import (
    EvaluationSlot,
    Evaluator,
    awaiting_evaluation,
    evaluated_round,
    load_global,
)
from server_app.failures import FederationError
from server_app.nodes import NodeDirectory
from server_app.preflight import Prepared, preflight
from server_app.rounds import progress_line, run_round
from strategies.base import LoraStrategy, StrategySettings
from strategies.registry import build_strategy
from strategies.sampling import wait_for_nodes as wait_for
from tasks.checks import DataCheck, check_partitions
from tasks.data import DataError

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


def train_config(cfg: RunConfig, server_round: int) -> ConfigRecord:
    """The knobs every node receives with its adapter in ``server_round``, its learning rate scheduled."""
    return ConfigRecord(dict(P.round_settings(cfg, server_round).items()))


def _stop(problems: list[str], code: int = 2, topic: str = "config") -> NoReturn:
    """End the ServerApp before round 1 with one log line per problem (nothing has been written)."""
    for problem in problems:
        log.error("%s: %s", topic, problem)
    raise SystemExit(code)


def build_evaluator(prep: Prepared, host: LoraHost) -> Evaluator:
    """The central evaluator over the held-out set, tokenized and scored as the preflight checked."""
    pairs = [(example, reference) for example, reference in prep.data.evaluation if example.has_response]
    return Evaluator(
        host=host,
        tokenizer=prep.tokenizer,
        examples=[example for example, _ in pairs],
        references=[reference for _, reference in pairs],
        metric=prep.data.metric,
        max_new_tokens=prep.cfg.task.max_new_tokens,
        labels=prep.data.labels,
        prompt=prep.prompt,
    )


def evaluation_row(evaluate: Evaluator, global_adapter: Adapter, data: DataCheck) -> dict[str, Any]:
    """The evaluation figures of a metrics row, with a warning for each figure there was nothing for."""
    figures: dict[str, Any] = dict(evaluate(global_adapter))
    for name, value in figures.items():
        if value is None:
            log.warning("evaluation: %s is n/a: no held-out example carries a response token", name)
    figures["metric"] = evaluate.metric
    if data.majority is not None:
        figures["majority_baseline"] = data.majority
    return figures


def check_data_split(cfg: RunConfig, nodes: NodeDirectory) -> dict[int, list[int]]:
    """Before round 1: the pool splits into partitions big enough for every admitted node; else stop.

    Returns the partition sizes by partition count, so that no node can claim more examples than its
    partition holds.
    """
    sizes: dict[int, list[int]] = {}
    try:
        for count in nodes.partition_counts():
            line, sizes[count] = check_partitions(cfg.task, count, cfg.seed)
            log.info(line)
    except DataError as exc:
        _stop([str(exc)])
    return sizes


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run ``num-server-rounds`` rounds of federated LoRA fine-tuning."""
    _setup_logging()
    try:
        prep = preflight(dict(context.run_config))
    except ConfigError as exc:
        _stop(exc.problems)
    cfg, model_path = prep.cfg, prep.model_path
    for note in prep.data.notes:
        log.warning("data: %s", note)
    baseline = "" if prep.data.majority is None else f"; majority-label baseline {prep.data.majority:.3f}"
    log.info("prompt format %s; held-out metric %s%s", prep.prompt.name, prep.data.metric, baseline)

    folder = RunFolder(run_folder_path(cfg.output.dir, cfg.output.run_name))
    log.info("loading base model %s (%s)", cfg.model.name, cfg.model.quantization)
    try:
        host = LoraHost(load_base_model(model_path, cfg.model), cfg.lora, seed=cfg.seed)
    except TargetModulesError as exc:
        _stop([str(exc)])
    evaluate = build_evaluator(prep, host)
    strategy = build_strategy(cfg.strategy.name, strategy_settings(cfg, host.fingerprint))
    nodes = NodeDirectory(host.fingerprint, cfg.strategy.rank_plan, cfg.lora.rank, cfg.strategy.max_rank)
    wait_for_nodes(grid, cfg.strategy.min_nodes, cfg.strategy.round_timeout)
    nodes.discover(grid, timeout=cfg.strategy.round_timeout)
    if not nodes.ranks:
        _stop([no_node_joined(nodes)], code=1, topic="federation")
    sizes = check_data_split(cfg, nodes)
    admit(strategy, nodes, sizes)

    meta = {"fingerprint": host.fingerprint, "strategy": cfg.strategy.name, "lora_rank": cfg.lora.rank}
    host.activate(strategy.global_rank(sorted(set(strategy.node_ranks.values()))))
    # The server keeps modules in sorted order: it fixes the order of the downlink's random draws.
    global_adapter = sorted_modules(strategy.initial_global(host.read()))
    rows: list[dict[str, Any]] = []
    slot = EvaluationSlot(
        lambda adapter: evaluation_row(evaluate, adapter, prep.data), cfg.evaluation.background
    )
    unwritten: list[dict[str, Any]] = []  # rows not yet in metrics.jsonl, in round order
    if cfg.output.resume:
        checkpoint = resume(prep, strategy, expected_keys(global_adapter), meta)
        global_adapter, rows = checkpoint.adapter, list(checkpoint.metrics)
        # The checkpoint's last round may have been stopped before its evaluation finished; its adapter is
        # the checkpoint's, so it is evaluated again now.
        unwritten = [row for row in rows[-1:] if awaiting_evaluation(row)]
        folder.rewrite_metrics(rows[: len(rows) - len(unwritten)])  # drops any line of a round in flight
        for row in unwritten:
            slot.start(row, global_adapter)
        folder.mark("running", server_round=checkpoint.round)
        log.info("resuming %s after round %d (nodes get whole adapters)", folder.path, checkpoint.round)
    else:
        folder.create({"run_config": cfg.to_dict(), "base_model_path": model_path, **meta})
        folder.mark("running", server_round=0)
        log.info("run folder %s", folder.path)
        unwritten.append({"round": 0, "evaluated": True})  # base + initial adapter: logged, not a metrics row
        slot.start(unwritten[0], global_adapter)
    strategy.summary()

    server_round = len(rows)
    try:
        for server_round in range(len(rows) + 1, cfg.num_server_rounds + 1):
            started = time.perf_counter()
            if nodes.discover(grid, timeout=cfg.strategy.round_timeout):
                admit(strategy, nodes, sizes)
            due = evaluated_round(server_round, cfg.evaluation.every, cfg.num_server_rounds)
            global_adapter, row = run_round(
                grid,
                strategy,
                server_round,
                global_adapter,
                train_config(cfg, server_round),
                cfg.strategy.round_timeout,
                evaluate_nodes=due,
            )
            row["evaluated"] = due
            if due:
                slot.start(row, global_adapter)  # after the one that ran while this round trained
            else:
                slot.wait()
            row["round_seconds"] = time.perf_counter() - started
            rows.append(row)
            unwritten.append(row)
            unwritten = write_rows(unwritten, folder, cfg.num_server_rounds, evaluate.figure_name())
            # A copy of each row: the evaluation thread may be filling the last one.
            snapshot = [dict(r) for r in rows]
            checkpoint = Checkpoint(server_round, global_adapter, strategy.state(), snapshot, meta)
            save_checkpoint(folder.path / CHECKPOINT_DIR, checkpoint)
        if unwritten:  # the last round's evaluation, which no training overlaps: it counts in its round
            rows[-1]["round_seconds"] += slot.wait()  # unwritten rows are rows' tail: rows is not empty
            write_rows(unwritten, folder, cfg.num_server_rounds, evaluate.figure_name())
            save_checkpoint(
                folder.path / CHECKPOINT_DIR,
                Checkpoint(server_round, global_adapter, strategy.state(), rows, meta),
            )
    except FederationError as exc:
        slot.close()
        folder.mark("failed", reason=str(exc), server_round=server_round)
        log.error("%s", exc)
        log.error("run stopped; %s is marked failed (status.json)", folder.path)
        raise SystemExit(1) from None
    except BaseException as exc:
        slot.close()
        folder.mark("failed", reason=f"{type(exc).__name__}: {exc}", server_round=server_round)
        raise
    slot.close()

    load_global(host, global_adapter)
    adapter_dir = folder.save_adapter(
        host.model.peft_config[host.active.name] if host.active else None,
        _peft_state(host),
        base_model_path=model_path,
    )
    folder.mark("completed", server_round=cfg.num_server_rounds)
    log.info("final adapter written to %s", adapter_dir)


def write_rows(
    unwritten: list[dict[str, Any]], folder: RunFolder, rounds: int, metric_name: str | None
) -> list[dict[str, Any]]:
    """Append (and log) the leading rows whose evaluation is done, in round order; the rest stay.

    A row whose evaluation is still running in the background has no ``eval_seconds`` yet.
    """
    while unwritten and not awaiting_evaluation(unwritten[0]):
        row = unwritten.pop(0)
        if row["round"] == 0:
            log.info("round 0 (base + initial adapter): %s", evaluation_text(row, metric_name))
        else:
            folder.append_metrics(row)
            log.info(progress_line(row, rounds, metric_name))
    return unwritten


def evaluation_text(figures: dict[str, Any], metric_name: str | None) -> str:
    """``eval_loss 1.2345 | exact_match 0.120`` for the round-0 line (n/a where there is no figure)."""
    parts = [("eval_loss", 4)] + ([(metric_name, 3)] if metric_name else [])
    texts = ["n/a" if figures.get(name) is None else f"{figures[name]:.{digits}f}" for name, digits in parts]
    return " | ".join(f"{name} {text}" for (name, _), text in zip(parts, texts, strict=True))


def no_node_joined(nodes: NodeDirectory) -> str:
    """Why no node could join, from the reasons the nodes were refused."""
    reasons = Counter(nodes.refused.values())
    if not reasons:
        return "no node answered the handshake within strategy.round-timeout"
    reason, count = reasons.most_common(1)[0]
    return f"no node could join ({count} of {len(nodes.refused)} refused): {reason}"


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
        uplink=WireSpec(bits=cfg.wire.uplink_bits, scheme=cfg.wire.scheme, block_size=cfg.wire.block_size),
        max_update_ratio=cfg.strategy.max_update_ratio,
        max_node_examples=cfg.strategy.max_node_examples,
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` nodes are connected (bounded by ``timeout`` seconds)."""
    wait_for(lambda: list(grid.get_node_ids()), count, timeout, "nodes")


def resume(
    prep: Prepared, strategy: LoraStrategy, expected: dict[str, tuple[int, ...]], meta: dict[str, Any]
) -> Checkpoint:
    """The run's last checkpoint (read by the preflight), checked strictly against this run now that the
    model is loaded, with the strategy's state restored.

    What only the nodes held (downlink views, error-feedback residuals) is not in it: a resumed run is a
    new Flower run, so nodes start without them and the strategy sends whole adapters first.
    """
    checkpoint = prep.checkpoint
    if checkpoint is None:
        raise RuntimeError("output.resume=true, but the preflight read no checkpoint")
    folder = run_folder_path(prep.cfg.output.dir, prep.cfg.output.run_name) / CHECKPOINT_DIR
    try:
        check_fits(checkpoint, expected, meta, folder)
        strategy.restore(checkpoint.strategy_state)
    except (CheckpointError, ValueError) as exc:
        _stop([f"output.resume: {exc}"])
    return checkpoint


def admit(strategy: LoraStrategy, nodes: NodeDirectory, sizes: dict[int, list[int]]) -> None:
    """Tell the strategy which nodes it may sample, at which rank, in which (partition) order, and how
    many examples each pool partition holds (``sizes``: partition count -> sizes)."""
    strategy.node_ranks = eligible_ranks(strategy, nodes)
    strategy.node_keys = {node_id: info.partition_id for node_id, info in nodes.infos.items()}
    strategy.partition_sizes = {
        node_id: sizes[info.num_partitions][info.partition_id]
        for node_id, info in nodes.infos.items()
        if not info.own_data and info.num_partitions in sizes and info.partition_id < info.num_partitions
    }


def eligible_ranks(strategy: LoraStrategy, nodes: NodeDirectory) -> dict[int, int]:
    """Node ranks the strategy can serve; equal-rank strategies leave other ranks out (logged)."""
    if strategy.mixed_ranks:
        return dict(nodes.ranks)
    rank = strategy.settings.global_rank
    for node_id, node_rank in nodes.ranks.items():
        if node_rank != rank:
            log.warning(
                "node %d trains rank %d; %s needs rank %d, so it is left out",
                node_id,
                node_rank,
                strategy.name,
                rank,
            )
    return {n: r for n, r in nodes.ranks.items() if r == rank}


def _peft_state(host: LoraHost) -> dict[str, Any]:
    from peft import get_peft_model_state_dict

    if host.active is None:
        raise RuntimeError("no active adapter to save")
    return dict(get_peft_model_state_dict(host.model, adapter_name=host.active.name))
