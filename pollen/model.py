"""Base-model loading (full precision, 8-bit or 4-bit NF4) and LoRA adapters of any rank on top.

A process loads its base model once; :class:`LoraHost` then keeps one PEFT adapter per rank on that
single base, so a simulation actor serving nodes of ranks 4 and 16 never re-quantizes the base.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pollen.adapter import Adapter, adapter_from_state_dict, adapter_to_state_dict
from pollen.config import LoraConfig, ModelConfig
from pollen.cpu_memory import release_checkpoint_file, return_large_blocks_to_os, reuse_heap_after_load
from pollen.device import quantization_config, resolve_compute_dtype, resolve_device
from pollen.targets import (
    model_fingerprint,
    resolve_target_modules,
    stores_weights_transposed,
)


class ModelNotFoundError(FileNotFoundError):
    """The configured base model is neither a local model folder nor reachable on the hub."""


def check_model_available(name_or_path: str) -> None:
    """Fail early, in one line, when ``model.name`` cannot be loaded on this machine."""
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model.name={name_or_path!r} is not a model folder: expected {path / 'config.json'} "
                "(a folder saved with save_pretrained), 'embedded', 'smollm2-135m', or a Hugging Face id"
            )
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model.name={name_or_path!r} could not be found: it is not a local folder and the Hugging Face "
            f"hub or cache did not provide it ({reason}); use 'embedded', 'smollm2-135m', a local folder, "
            "or a reachable id"
        ) from exc


# Files a local model folder holds its weights in, in the order transformers prefers them.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Files one of which a tokenizer that AutoTokenizer can build needs (fast, SentencePiece, BPE, WordPiece).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)
_MAX_HEADER = 100 * 1024**2  # safetensors refuses headers above 100 MB


def _safetensors_damage(path: Path) -> str:
    """'' when the file's header parses and the file is as long as the header says; else what is wrong."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(size - 8, _MAX_HEADER):
                return f"{path.name} is truncated or not a safetensors file ({size} bytes)"
            header = json.loads(handle.read(length))
        tensors = [v for k, v in header.items() if k != "__metadata__"]
        end = max((int(v["data_offsets"][1]) for v in tensors), default=0)
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return f"{path.name} has a damaged header (not a safetensors file?)"
    if 8 + length + end != size:
        return f"{path.name} is truncated: {size} bytes, its header describes {8 + length + end}"
    return ""


def _torch_file_damage(path: Path) -> str:
    """'' when ``path`` looks like a whole torch.save file (a zip archive, or a legacy pickle)."""
    import zipfile

    try:
        with open(path, "rb") as handle:
            first = handle.read(1)
        if zipfile.is_zipfile(path) or first == b"\x80":
            return ""
    except OSError as exc:
        return f"{path.name} cannot be read ({exc.strerror or exc})"
    return f"{path.name} is truncated or not a PyTorch checkpoint"


def _shard_damage(folder: Path, index_name: str) -> str:
    """What is wrong with a sharded checkpoint: its index, or the first missing or damaged shard."""
    try:
        index = json.loads((folder / index_name).read_text(encoding="utf-8"))
        shards = sorted({str(shard) for shard in index["weight_map"].values()})
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return f"{index_name} is damaged (expected a JSON object with a 'weight_map')"
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            return f"{index_name} names {shard}, which is missing"
        damage = _safetensors_damage(path) if path.suffix == ".safetensors" else _torch_file_damage(path)
        if damage:
            return damage
    return ""


def check_model_files(name_or_path: str) -> dict[str, str]:
    """Problems of a local model folder, read without loading a weight: {part: one line}, {} when whole.

    Parts are ``config`` (config.json does not parse), ``weights`` (none, or truncated/unreadable) and
    ``tokenizer`` (no tokenizer file). Hub ids are not folders and give {}: the hub is checked on load.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return {}
    problems: dict[str, str] = {}
    from transformers import AutoConfig

    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        AutoConfig.from_pretrained(str(folder))
    except json.JSONDecodeError as exc:
        problems["config"] = (
            f"model folder {folder}: config.json is not valid JSON (line {exc.lineno} column {exc.colno}: "
            f"{exc.msg}); save the model again with save_pretrained"
        )
    except Exception as exc:  # transformers raises many types for a bad config.json
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        problems["config"] = (
            f"model folder {folder}: config.json does not load ({reason}); save the model again with "
            "save_pretrained"
        )
    present = [name for name in _WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        problems["weights"] = (
            f"model folder {folder} holds no weights: expected model.safetensors (or a sharded "
            "model.safetensors.index.json, or pytorch_model.bin); save the model into it with save_pretrained"
        )
    else:
        name = present[0]
        if name.endswith(".index.json"):
            damage = _shard_damage(folder, name)
        elif name.endswith(".safetensors"):
            damage = _safetensors_damage(folder / name)
        else:
            damage = _torch_file_damage(folder / name)
        if damage:
            problems["weights"] = f"model folder {folder}: {damage}; copy or save the model again"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        problems["tokenizer"] = (
            f"model folder {folder} has no tokenizer: expected tokenizer.json or tokenizer.model; save the "
            "model's tokenizer into it with tokenizer.save_pretrained"
        )
    return problems


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    name_or_path: str, config: ModelConfig, device_override: str = "", compact_heap: bool = False
) -> torch.nn.Module:
    """The frozen base causal LM, quantized per ``config.quantization``, on the configured device.

    On the CPU, ``compact_heap`` keeps every block of 64 KiB or more mapped on its own after the load
    too: less memory, slower steps; a node with train.gradient-checkpointing, which already trades time
    for memory, asks for it (docs/BENCHMARKS.md, node memory).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the per-round progress lines
    device = resolve_device(device_override or config.device)
    if device.type == "cpu":
        return_large_blocks_to_os()  # for the load's temporaries; reuse_heap_after_load ends it
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    quant = quantization_config(config.quantization, dtype)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": str(device)}
    model: Any = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    if quant is None:
        model = model.to(device)
    else:
        keep_4bit_layers_trainable(model)
        if device.type == "cpu":
            release_checkpoint_file(model)
    model.requires_grad_(False)
    model.eval()
    if device.type == "cpu" and not compact_heap:
        reuse_heap_after_load()
    return model


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes (0.49, 0.50) repacks a 4-bit layer's weight in place the
    first time it runs in eval mode without gradients, and from then on uses a kernel with no
    backward: every LoRA factor upstream of such a layer silently stops learning after the first
    evaluation. Pollen alternates evaluation and training on one loaded model, so it turns the
    repacking off right after loading, before anything has run.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010 (keeps mypy off Module.__setattr__)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute every decoder layer's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing (``use_reentrant=False``) carries gradients to the LoRA factors inside
    a layer even though the layer's input (the frozen embeddings' output) needs no gradient, so the
    4-bit base needs no ``enable_input_require_grads``; it also replays the RNG, so LoRA dropout draws
    the same mask twice. transformers applies it only in training mode with gradients enabled:
    evaluation and generation on the same model run as before.
    """
    enable = getattr(model, "activation_checkpointing_enable", None) or getattr(
        model, "gradient_checkpointing_enable", None
    )
    if not callable(enable) or not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient-checkpointing=true: {type(model).__name__} does not support gradient "
            "checkpointing; set it to false"
        )
    enable({"use_reentrant": False})


def check_target_modules(name_or_path: str, requested: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`resolve_target_modules` on the model's architecture alone, built without weights.

    For the server's preflight: a bad ``lora.target-modules`` is reported with the other config
    problems, before any weight is read or the run folder is written.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):  # shapes and names only: no memory, no initialisation cost
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model.name={name_or_path!r}: transformers cannot build a causal LM from its config ({reason})"
        ) from exc
    return resolve_target_modules(skeleton, requested)


@dataclass(frozen=True)
class AdapterSlot:
    """The name PEFT knows an adapter by, and its LoRA rank and scale."""

    name: str
    rank: int
    scale: float


class LoraHost:
    """One base model carrying one PEFT LoRA adapter per rank; exactly one is active at a time."""

    def __init__(
        self, base: torch.nn.Module, lora: LoraConfig, seed: int = 0, gradient_checkpointing: bool = False
    ) -> None:
        """Resolve the LoRA targets on ``base`` (raises :class:`TargetModulesError` when they do not fit).

        ``gradient_checkpointing`` (train.gradient-checkpointing) recomputes each decoder layer in the
        backward pass instead of keeping its activations; it acts in training only, never in evaluation.
        """
        self.target_modules = resolve_target_modules(base, lora.target_modules)
        if gradient_checkpointing:
            enable_gradient_checkpointing(base)
        self.lora = lora
        self.seed = seed
        self.fingerprint = model_fingerprint(base, self.target_modules)
        self._fan_in_fan_out = stores_weights_transposed(base, self.target_modules)
        self._base = base
        self._model: Any = None
        self._slots: dict[int, AdapterSlot] = {}
        self.active: AdapterSlot | None = None

    @property
    def model(self) -> Any:
        """The PEFT model (created with the first adapter)."""
        if self._model is None:
            raise RuntimeError("no adapter yet: call activate(rank) first")
        return self._model

    def _peft_config(self, rank: int) -> Any:
        from peft import LoraConfig as PeftLoraConfig

        return PeftLoraConfig(
            r=rank,
            lora_alpha=self.lora.alpha,  # type: ignore[arg-type]  # PEFT annotates int, uses it as a float
            lora_dropout=self.lora.dropout,
            target_modules=list(self.target_modules),
            fan_in_fan_out=self._fan_in_fan_out,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def activate(self, rank: int) -> AdapterSlot:
        """Make the rank-``rank`` adapter the trained and applied one, creating it (seeded) if new.

        A new adapter's layers (its LoRA dropout among them) are created in training mode; the model is
        put back in evaluation mode, so scoring never applies dropout (training switches it on and off).
        """
        if rank not in self._slots:
            slot = AdapterSlot(name=f"rank{rank}", rank=rank, scale=self.lora.alpha / rank)
            torch.manual_seed(self.seed + rank)
            if self._model is None:
                from peft import get_peft_model

                self._model = get_peft_model(self._base, self._peft_config(rank), adapter_name=slot.name)
            else:
                self._model.add_adapter(slot.name, self._peft_config(rank))
            self._model.eval()
            self._slots[rank] = slot
        slot = self._slots[rank]
        self.model.set_adapter(slot.name)
        self.active = slot
        return slot

    def read(self) -> Adapter:
        """The active adapter's factors (float32 copies) with their scale."""
        from peft import get_peft_model_state_dict

        slot = self._require_active()
        state = get_peft_model_state_dict(self.model, adapter_name=slot.name)
        return adapter_from_state_dict(state, scale=slot.scale)

    def write(self, adapter: Adapter) -> None:
        """Load factors into the active adapter; modules or shapes that do not match are an error."""
        from peft import set_peft_model_state_dict

        slot = self._require_active()
        current = self.read()
        if adapter.keys() != current.keys():
            extra = sorted(set(adapter) - set(current))[:3]
            missing = sorted(set(current) - set(adapter))[:3]
            raise ValueError(f"adapter modules do not match the model: unexpected {extra}, missing {missing}")
        for module, pair in adapter.items():
            mine = current[module]
            if pair.a.shape != mine.a.shape or pair.b.shape != mine.b.shape:
                raise ValueError(
                    f"adapter for {module} has A{tuple(pair.a.shape)} B{tuple(pair.b.shape)}, "
                    f"the rank-{slot.rank} model expects A{tuple(mine.a.shape)} B{tuple(mine.b.shape)}"
                )
        dtype = next(p for p in self.model.parameters() if p.requires_grad).dtype
        state = {k: v.to(dtype) for k, v in adapter_to_state_dict(adapter).items()}
        result = set_peft_model_state_dict(self.model, state, adapter_name=slot.name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ValueError(f"adapter keys not in the model: {unexpected[:3]}")

    def trainable_parameters(self, include_a: bool = True) -> list[torch.nn.Parameter]:
        """The active adapter's LoRA parameters; ``include_a=False`` freezes the A factors (FFA-LoRA)."""
        slot = self._require_active()
        chosen = []
        for name, param in self.model.named_parameters():
            if f".{slot.name}." not in name + "." or "lora_" not in name:
                continue
            frozen_a = not include_a and ".lora_A." in name
            param.requires_grad_(not frozen_a)
            if not frozen_a:
                chosen.append(param)
        return chosen

    def _require_active(self) -> AdapterSlot:
        if self.active is None:
            raise RuntimeError("no active adapter: call activate(rank) first")
        return self.active
