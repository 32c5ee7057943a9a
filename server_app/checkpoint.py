"""Round checkpoints of the ServerApp, so a stopped run continues from its last completed round.

A checkpoint folder holds one ``adapter-<round>.safetensors`` (the global adapter in its stored form,
``pollen.adapter.to_stored``: fp32 factors and exact scales, plus any tensor of the strategy state)
and ``checkpoint.json`` (round, file name, SHA-256, the JSON part of the strategy state, metrics rows,
metadata). Both are written to temporary names and renamed; the JSON is
renamed last and is the commit point, so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pollen.adapter import Adapter, from_stored, to_stored

STATE_FILE = "checkpoint.json"
FORMAT_VERSION = 2  # 2: the adapter's module order is kept (it fixes the order of random draws)
_STRATEGY_PREFIX = "strategy/"  # tensors of the strategy state live in the safetensors under this prefix


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged or does not fit the run that wants to resume from it."""


@dataclass(frozen=True)
class Checkpoint:
    """Everything a run needs to continue after ``round``."""

    round: int  # the last completed round
    adapter: Adapter  # the global adapter, factors and scales
    # LoraStrategy.state(): JSON values or tensors, flat
    strategy_state: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)  # one row per completed round
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. base-model fingerprint, rank, strategy name


def _adapter_file(server_round: int) -> str:
    return f"adapter-{server_round:06d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort: some file systems cannot open folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_ready(value: Any, where: str) -> Any:
    """``value`` checked for JSON (finite numbers, str keys); CheckpointError names the bad entry."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CheckpointError(f"{where}={value!r} cannot be checkpointed: JSON has no NaN or infinity")
        return value
    if isinstance(value, (list, tuple)):
        return [_json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where} has key {key!r}: checkpoint keys must be strings")
            out[key] = _json_ready(item, f"{where}.{key}")
        return out
    raise CheckpointError(
        f"{where} is a {type(value).__name__}: checkpoints hold JSON values (numbers, strings, lists, "
        "dicts) and, at the top level of the strategy state, tensors"
    )


def _split_strategy_state(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            tensors[_STRATEGY_PREFIX + key] = value
        else:
            plain[key] = _json_ready(value, f"strategy_state.{key}")
    return tensors, plain


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` atomically into ``folder`` and drop older adapter files; returns the JSON path."""
    from safetensors.torch import save_file

    if checkpoint.round < 0:
        raise CheckpointError(f"round={checkpoint.round} is not valid: expected an integer >= 0")
    stored = to_stored(checkpoint.adapter)
    bad = [k for k in stored if k.startswith(_STRATEGY_PREFIX)]
    if bad:
        raise CheckpointError(f"adapter key {bad[0]!r} uses the reserved prefix {_STRATEGY_PREFIX!r}")
    strategy_tensors, strategy_plain = _split_strategy_state(checkpoint.strategy_state)
    document = {
        "format": FORMAT_VERSION,
        "round": checkpoint.round,
        "strategy_state": strategy_plain,
        "metrics": _json_ready(checkpoint.metrics, "metrics"),
        "meta": _json_ready(checkpoint.meta, "meta"),
        # safetensors files sort their keys; the order of the modules decides the order of the codec's
        # and the projections' random draws, so a resumed run needs it to continue equal.
        "modules": list(checkpoint.adapter),
    }

    folder.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share memory (e.g. views of one decoded buffer)
    tensors = {k: v.detach().cpu().clone() for k, v in {**stored, **strategy_tensors}.items()}
    name = _adapter_file(checkpoint.round)
    tmp_tensors = folder / f".{name}.tmp"
    save_file(tensors, str(tmp_tensors), metadata={"format": "pt"})
    with open(tmp_tensors, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp_tensors, folder / name)

    document.update(adapter_file=name, adapter_sha256=_sha256(folder / name))
    state_path = folder / STATE_FILE
    tmp_state = folder / f".{STATE_FILE}.tmp"
    with open(tmp_state, "w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=1, sort_keys=True, allow_nan=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp_state, state_path)
    _fsync_dir(folder)

    for old in folder.glob("adapter-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return state_path


def checkpoint_round(folder: Path) -> int | None:
    """The last completed round recorded in ``folder``, or None when it holds no checkpoint."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        return _round_of(document["round"], path)
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} is damaged ({exc}); remove the folder or restore it") from exc


def _round_of(value: Any, path: Path) -> int:
    """A checkpoint's round: a whole number >= 0 (JSON may hold 1e400, 2.5 or a string there)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise CheckpointError(f"{path} records round {str(value)[:40]}; expected a whole number >= 0")
    return value


def _read_document(folder: Path) -> dict[str, Any]:
    path = folder / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint in {folder}: expected {path}; the run to resume has not completed a round "
            "(check output.dir and output.run-name)"
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(document, dict) or document.get("format") != FORMAT_VERSION:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise CheckpointError(f"{path} has format {found!r}; this Pollen reads format {FORMAT_VERSION}")
    missing = [
        k
        for k in ("round", "adapter_file", "adapter_sha256", "strategy_state", "metrics", "meta", "modules")
        if k not in document
    ]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}; the checkpoint is damaged")
    return document


def expected_keys(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """The stored keys and shapes a checkpoint of an adapter shaped like ``adapter`` must have."""
    return {key: tuple(tensor.shape) for key, tensor in to_stored(adapter).items()}


def _check_keys(
    adapter: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], source: Path
) -> None:
    """Strict load: every expected factor present with its shape, nothing else."""
    missing = sorted(set(expected) - set(adapter))
    unexpected = sorted(set(adapter) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit this run's adapter: missing keys {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
            f"{' ...' if len(unexpected) > 5 else ''} (same base model, target modules and rank?)"
        )
    for key, shape in expected.items():
        if tuple(adapter[key].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint {source}: {key} has shape {tuple(adapter[key].shape)}, this run expects "
                f"{tuple(shape)} (same lora.rank as the run being resumed?)"
            )


def check_meta(meta: Mapping[str, Any], require: Mapping[str, Any], folder: Path) -> None:
    """CheckpointError unless every ``require`` entry equals the checkpoint's metadata."""
    for key, wanted in require.items():
        if meta.get(key) != wanted:
            raise CheckpointError(
                f"checkpoint {folder} was made with {key}={meta.get(key)!r}, this run has {key}={wanted!r}; "
                "resume with the configuration of the original run"
            )


def check_fits(
    checkpoint: Checkpoint, expected: Mapping[str, tuple[int, ...]], require: Mapping[str, Any], folder: Path
) -> None:
    """The strict checks of :func:`load_checkpoint` on a checkpoint already loaded without them."""
    _check_keys(to_stored(checkpoint.adapter), expected, folder)
    check_meta(checkpoint.meta, require, folder)


def load_checkpoint(
    folder: Path,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    require: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Read the checkpoint in ``folder``; fail with one line when it is damaged or does not fit.

    ``expected`` maps every key of the stored adapter to its shape (:func:`expected_keys`; strict:
    missing and unexpected keys are both reported); ``require`` lists metadata that must be equal
    (e.g. the base-model fingerprint).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    document = _read_document(folder)
    tensor_path = folder / str(document["adapter_file"])
    if not tensor_path.is_file():
        raise CheckpointError(f"{folder / STATE_FILE} names {tensor_path.name}, which is missing")
    if _sha256(tensor_path) != document["adapter_sha256"]:
        raise CheckpointError(f"{tensor_path} does not match the checksum in {STATE_FILE}; it is damaged")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{tensor_path} could not be read: {exc}") from exc

    stored = {k: v for k, v in tensors.items() if not k.startswith(_STRATEGY_PREFIX)}
    strategy_state: dict[str, Any] = dict(document["strategy_state"])
    for key, value in tensors.items():
        if key.startswith(_STRATEGY_PREFIX):
            strategy_state[key[len(_STRATEGY_PREFIX) :]] = value
    if expected is not None:  # before from_stored, so a misfit names keys rather than a missing scale
        _check_keys(stored, expected, tensor_path)
    try:
        loaded = from_stored(stored)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{tensor_path} does not hold a whole adapter: {exc}") from exc
    order = document["modules"]
    if not isinstance(order, list) or sorted(order) != sorted(loaded):
        raise CheckpointError(f"{folder / STATE_FILE}: its module list does not match {tensor_path.name}")
    adapter = {module: loaded[module] for module in order}
    if not isinstance(document["meta"], dict) or not isinstance(document["metrics"], list):
        raise CheckpointError(f"{folder / STATE_FILE}: its meta or metrics entry is damaged")
    meta = dict(document["meta"])
    check_meta(meta, require or {}, folder)
    return Checkpoint(
        round=_round_of(document["round"], folder / STATE_FILE),
        adapter=adapter,
        strategy_state=strategy_state,
        metrics=list(document["metrics"]),
        meta=meta,
    )
