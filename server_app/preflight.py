"""The server's preflight: every check that can fail on user input, run before anything is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pollen.config import ConfigError, RunConfig, parse_run_config
from pollen.model import (
    check_model_available,
    check_model_files,
    check_target_modules,
    load_tokenizer,
)
from pollen.targets import TargetModulesError
from server_app.artifacts import check_output
from server_app.checkpoint import Checkpoint
from strategies.registry import STRATEGY_CLASSES
from tasks.checks import DataCheck, check_task_data
from tasks.data import DataError, check_data_source
from tasks.embedded import resolve_model_name
from tasks.prompts import ALPACA, PromptFormat, PromptFormatError, resolve_prompt_format


@dataclass(frozen=True)
class Prepared:
    """What the preflight checked and the run uses: config, model path, tokenizer, prompt format, data."""

    cfg: RunConfig
    model_path: str
    tokenizer: Any
    prompt: PromptFormat
    data: DataCheck
    checkpoint: Checkpoint | None = None  # output.resume: the checkpoint, read once by the check


def preflight(run_config: dict[str, Any]) -> Prepared:
    """Every check that can fail on user input, before anything is written or trained.

    Raises ConfigError with one line per problem: configuration, device, model folder, prompt format,
    data files, columns, lengths against train.max-seq-len, the metric, output.dir and the run folder
    (or, resuming, the checkpoint and whether it belongs to a run configured like this one).
    """
    cfg = parse_run_config(run_config)
    problems: list[str] = check_strategy_ranks(cfg) + check_device(cfg.model.device)
    model_path, tokenizer, prompt = check_model(cfg, problems)
    data = DataCheck()
    try:
        check_data_source(cfg.task)
    except DataError as exc:
        problems.append(str(exc))
    else:
        if tokenizer is not None:
            data = check_task_data(cfg.task, cfg.seed, tokenizer, cfg.train.max_seq_len, prompt)
            problems.extend(data.problems)
    output_problems, checkpoint = check_output(cfg, model_path)
    problems.extend(output_problems)
    if problems:
        raise ConfigError(problems)
    return Prepared(cfg, model_path, tokenizer, prompt, data, checkpoint)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_model(cfg: RunConfig, problems: list[str]) -> tuple[str, Any, PromptFormat]:
    """(model path, tokenizer or None, prompt format); each problem of model.name added to ``problems``:
    not found, its folder incomplete or damaged (read without loading a weight), no tokenizer, a prompt
    format it cannot use, target modules it lacks."""
    try:
        model_path = resolve_model_name(cfg.model.name)
        check_model_available(model_path)
    except (OSError, ValueError) as exc:  # not a folder, not on the hub; the embedded weights missing
        problems.append(_first_line(exc))
        return "", None, ALPACA
    damage = check_model_files(model_path)
    problems.extend(damage.values())
    if "config" in damage or "tokenizer" in damage:
        return model_path, None, ALPACA
    try:
        tokenizer = load_tokenizer(model_path)
        prompt = resolve_prompt_format(cfg.task.prompt_format, tokenizer)
    except PromptFormatError as exc:
        problems.append(str(exc))
        return model_path, None, ALPACA
    except (OSError, ValueError, TypeError, KeyError, ImportError) as exc:  # tokenizer files that do not load
        problems.append(
            f"model.name={cfg.model.name!r}: its tokenizer does not load ({_first_line(exc)}); save a "
            "working tokenizer into the model folder with tokenizer.save_pretrained"
        )
        return model_path, None, ALPACA
    try:  # on the architecture alone (no weights): the layer names the model has
        check_target_modules(model_path, cfg.lora.target_modules)
    except (TargetModulesError, OSError) as exc:
        problems.append(str(exc))
    return model_path, tokenizer, prompt


def check_device(requested: str) -> list[str]:
    """model.device names a device this machine has: the server loads the base model on it."""
    from pollen.device import resolve_device

    try:
        resolve_device(requested)
    except RuntimeError as exc:  # CUDA, a CUDA index or MPS that this machine lacks
        return [str(exc)]
    return []


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
