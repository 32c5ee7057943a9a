"""ServerApp: check the configuration, run the federated rounds, evaluate, write the run folder."""

from __future__ import annotations

import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, NoReturn

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from pollen import protocol as P
from pollen.adapter import Adapter
from pollen.codec import WireSpec
from pollen.config import ConfigError, RunConfig, parse_run_config
from pollen.model import (
    LoraHost,
    check_model_available,
    check_target_modules,
    load_base_model,
    load_tokenizer,
)
from pollen.targets import TargetModulesError
from server_app.artifacts import CHECKPOINT_DIR, RunFolder, check_run_folder_free, run_folder_path
from server_app.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_round,
    expected_keys,
    load_checkpoint,
    save_checkpoint,
)
from server_app.evaluation import Evaluator, load_global
from server_app.failures import FederationError
from server_app.nodes import NodeDirectory
from server_app.rounds import progress_line, run_round
from strategies.base import LoraStrategy, StrategySettings
from strategies.registry import STRATEGY_CLASSES, build_strategy
from strategies.sampling import wait_for_nodes as wait_for
from tasks.checks import DataCheck, check_partitions, check_task_data
from tasks.data import DataError, check_data_source
from tasks.embedded import resolve_model_name
from tasks.prompts import ALPACA, PromptFormat, PromptFormatError, resolve_prompt_format

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


@dataclass(frozen=True)
class Prepared:
    """What the preflight checked and the run uses: config, model path, tokenizer, prompt format, data."""

    cfg: RunConfig
    model_path: str
    tokenizer: Any
    prompt: PromptFormat
    data: DataCheck


def preflight(run_config: dict[str, Any]) -> Prepared:
    """Every check that can fail on user input, before anything is written or trained.

    Raises ConfigError with one line per problem: configuration, model, prompt format, data files,
    columns, lengths against train.max-seq-len, the metric, and the run folder.
    """
    cfg = parse_run_config(run_config)
    problems: list[str] = check_strategy_ranks(cfg)
    model_path, tokenizer, prompt = "", None, ALPACA
    try:
        model_path = resolve_model_name(cfg.model.name)
        check_model_available(model_path)
        tokenizer = load_tokenizer(model_path)
        prompt = resolve_prompt_format(cfg.task.prompt_format, tokenizer)
    except PromptFormatError as exc:
        problems.append(str(exc))
    except (OSError, ValueError) as exc:  # a missing model, or one whose tokenizer does not load
        problems.append(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if tokenizer is not None:
        try:  # on the architecture alone (no weights): the layer names the model has
            check_target_modules(model_path, cfg.lora.target_modules)
        except (TargetModulesError, OSError) as exc:
            problems.append(str(exc))
    data = DataCheck()
    try:
        check_data_source(cfg.task)
    except DataError as exc:
        problems.append(str(exc))
    else:
        if tokenizer is not None:
            data = check_task_data(cfg.task, cfg.seed, tokenizer, cfg.train.max_seq_len, prompt)
            problems.extend(data.problems)
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
    return Prepared(cfg=cfg, model_path=model_path, tokenizer=tokenizer, prompt=prompt, data=data)


def check_strategy_ranks(cfg: RunConfig) -> list[str]:
    """A rank plan that mixes ranks needs a strategy that can aggregate mixed ranks."""
    cls = STRATEGY_CLASSES[cfg.strategy.name]
    ranks = set(cfg.strategy.rank_plan) | {cfg.lora.rank}
    if cls.mixed_ranks or len(ranks) == 1:
        return []
    mixing = ", ".join(repr(n) for n, c in STRATEGY_CLASSES.items() if c.mixed_ranks)
    return [
        f"strategy.rank-plan={','.join(map(str, cfg.strategy.rank_plan))!r} mixes ranks (with lora.rank="
        f"{cfg.lora.rank}), but strategy.name={cfg.strategy.name!r} needs one rank: use one of {mixing}, "
        "or a plan of lora.rank only"
    ]


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


def check_data_split(cfg: RunConfig, nodes: NodeDirectory) -> None:
    """Before round 1: the pool splits into partitions big enough for every admitted node; else stop."""
    try:
        for count in nodes.partition_counts():
            log.info(check_partitions(cfg.task, count, cfg.seed))
    except DataError as exc:
        _stop([str(exc)])


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
    nodes = NodeDirectory(host.fingerprint, cfg.strategy.rank_plan, cfg.lora.rank)
    wait_for_nodes(grid, cfg.strategy.min_nodes, cfg.strategy.round_timeout)
    nodes.discover(grid, timeout=cfg.strategy.round_timeout)
    if not nodes.ranks:
        _stop([no_node_joined(nodes)], code=1, topic="federation")
    check_data_split(cfg, nodes)
    admit(strategy, nodes)

    meta = {"fingerprint": host.fingerprint, "strategy": cfg.strategy.name}
    host.activate(strategy.global_rank(sorted(set(strategy.node_ranks.values()))))
    global_adapter = strategy.initial_global(host.read())
    rows: list[dict[str, Any]] = []
    if cfg.output.resume:
        checkpoint = resume(folder, strategy, expected_keys(global_adapter), meta)
        global_adapter, rows = checkpoint.adapter, list(checkpoint.metrics)
        folder.rewrite_metrics(rows)  # drops any line of a round that was in flight
        folder.mark("running", server_round=checkpoint.round)
        log.info("resuming %s after round %d (nodes get whole adapters)", folder.path, checkpoint.round)
    else:
        folder.create({"run_config": cfg.to_dict(), "base_model_path": model_path, **meta})
        folder.mark("running", server_round=0)
        log.info("run folder %s", folder.path)
        round0 = evaluation_row(evaluate, global_adapter, prep.data)
        log.info("round 0 (base + initial adapter): %s", evaluation_text(round0, evaluate.figure_name()))
    strategy.summary()

    server_round = len(rows)
    try:
        for server_round in range(len(rows) + 1, cfg.num_server_rounds + 1):
            started = time.perf_counter()
            if nodes.discover(grid, timeout=cfg.strategy.round_timeout):
                admit(strategy, nodes)
            global_adapter, row = run_round(
                grid,
                strategy,
                server_round,
                global_adapter,
                train_config(cfg, server_round),
                cfg.strategy.round_timeout,
            )
            row.update(evaluation_row(evaluate, global_adapter, prep.data))
            row["round_seconds"] = time.perf_counter() - started
            rows.append(row)
            folder.append_metrics(row)
            checkpoint = Checkpoint(server_round, global_adapter, strategy.state(), rows, meta)
            save_checkpoint(folder.path / CHECKPOINT_DIR, checkpoint)
            log.info(progress_line(row, cfg.num_server_rounds, evaluate.figure_name()))
    except FederationError as exc:
        folder.mark("failed", reason=str(exc), server_round=server_round)
        log.error("%s", exc)
        log.error("run stopped; %s is marked failed (status.json)", folder.path)
        raise SystemExit(1) from None
    except BaseException as exc:
        folder.mark("failed", reason=f"{type(exc).__name__}: {exc}", server_round=server_round)
        raise

    load_global(host, global_adapter)
    adapter_dir = folder.save_adapter(
        host.model.peft_config[host.active.name] if host.active else None,
        _peft_state(host),
        base_model_path=model_path,
    )
    folder.mark("completed", server_round=cfg.num_server_rounds)
    log.info("final adapter written to %s", adapter_dir)


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
    )


def wait_for_nodes(grid: Grid, count: int, timeout: float) -> None:
    """Block until ``count`` nodes are connected (bounded by ``timeout`` seconds)."""
    wait_for(lambda: list(grid.get_node_ids()), count, timeout, "nodes")


def resume(
    folder: RunFolder, strategy: LoraStrategy, expected: dict[str, tuple[int, ...]], meta: dict[str, Any]
) -> Checkpoint:
    """The run's last checkpoint, checked strictly against this run, with the strategy's state restored.

    What only the nodes held (downlink views, error-feedback residuals) is not in it: a resumed run is a
    new Flower run, so nodes start without them and the strategy sends whole adapters first.
    """
    try:
        checkpoint = load_checkpoint(folder.path / CHECKPOINT_DIR, expected=expected, require=meta)
        strategy.restore(checkpoint.strategy_state)
    except (CheckpointError, ValueError) as exc:
        _stop([f"output.resume: {exc}"])
    return checkpoint


def admit(strategy: LoraStrategy, nodes: NodeDirectory) -> None:
    """Tell the strategy which nodes it may sample, at which rank, in which (partition) order."""
    strategy.node_ranks = eligible_ranks(strategy, nodes)
    strategy.node_keys = {node_id: info.partition_id for node_id, info in nodes.infos.items()}


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
