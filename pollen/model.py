"""Base-model loading (full precision, 8-bit or 4-bit NF4) and LoRA adapters of any rank on top.

A process loads its base model once; :class:`LoraHost` then keeps one PEFT adapter per rank on that
single base, so a simulation actor serving nodes of ranks 4 and 16 never re-quantizes the base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pollen.adapter import Adapter, adapter_from_state_dict, adapter_to_state_dict
from pollen.config import LoraConfig, ModelConfig
from pollen.device import quantization_config, resolve_compute_dtype, resolve_device


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


def load_tokenizer(name_or_path: str) -> Any:
    """The model's tokenizer, with a pad token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(name_or_path: str, config: ModelConfig, device_override: str = "") -> torch.nn.Module:
    """The frozen base causal LM, quantized per ``config.quantization``, on the configured device."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per load would drown the per-round progress lines
    device = resolve_device(device_override or config.device)
    if device.type == "cpu":
        return_large_blocks_to_os()  # from here on: the load's temporaries and every step's activations
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
    return model


def release_checkpoint_file(model: torch.nn.Module) -> None:
    """Give a quantized model on the CPU its own copy of the tensors left unquantized, then free the heap.

    Loading maps the whole safetensors file; the tensors bitsandbytes does not quantize (embeddings,
    norms) stay views into that map, which keeps every page of the file resident (about the size of
    the float32 checkpoint) for as long as the model lives, next to the 4-bit weights made from it.
    Copying those few tensors lets the map go; ``malloc_trim`` then hands the quantization's freed
    temporaries back to the OS. For SmolLM2-135M this takes a loaded node from ~1.2 GB to ~0.6 GB
    resident (docs/BENCHMARKS.md, node memory).
    """
    seen: set[int] = set()
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is None or id(tensor) in seen or tensor.device.type != "cpu":
                continue
            seen.add(id(tensor))
            if isinstance(tensor, torch.nn.Parameter):
                if type(tensor) is torch.nn.Parameter:  # bitsandbytes' Params4bit/Int8Params own their data
                    tensor.data = tensor.data.clone()
            else:
                module._buffers[name] = tensor.clone()
    import gc

    gc.collect()
    _return_freed_heap()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024  # glibc's initial threshold, kept fixed instead of growing to 32 MiB


def return_large_blocks_to_os() -> None:
    """Give every CPU allocation of 64 KiB or more its own mapping, so freeing it returns it to the OS.

    glibc raises its mmap threshold each time a large block is freed, after which a training step's
    activations and the dequantized 4-bit weights of every layer come from the heap, where short-lived
    and long-lived blocks interleave and the heap never shrinks: on SmolLM2 that fragmentation was
    about half of a node's training peak (docs/BENCHMARKS.md, node memory). Fixing the threshold costs page
    faults on every large allocation (slower CPU steps) and is process-wide; a no-op without glibc.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _return_freed_heap() -> None:
    """Ask glibc to return freed heap pages to the OS (a no-op elsewhere)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


def _libc() -> Any:
    """The C library, or None where it cannot be loaded by name."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name) if name else None
    except OSError:
        return None


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


# ---- LoRA targets ---------------------------------------------------------------------------------
ALL_LINEAR = "all-linear"  # lora.target-modules: every linear layer except the output head (PEFT's meaning)


class TargetModulesError(ValueError):
    """``lora.target-modules`` does not fit the base model; the one-line message lists the layers it has."""


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer LoRA can adapt as a linear map; None for other modules.

    Covers ``nn.Linear`` and its bitsandbytes subclasses (read from attributes: a packed 4-bit weight
    has no useful shape), GPT-2's ``Conv1D`` (weight stored (in, out)), and a PEFT LoRA layer wrapping
    either, so a fingerprint taken after wrapping equals the one taken before.
    """
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features), int(module.out_features)
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape  # (in_features, out_features)
        return int(fan_in), int(fan_out)
    base = getattr(module, "base_layer", None)  # PEFT keeps the original layer here
    return linear_shape(base) if isinstance(base, torch.nn.Module) else None


def _linear_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, tuple[int, int]]]:
    """(path, module, (in, out)) of every linear layer, in model order."""
    found = []
    for path, module in model.named_modules():
        shape = linear_shape(module)
        if path and shape is not None:
            found.append((path, module, shape))
    return found


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def linear_layer_names(model: torch.nn.Module) -> tuple[str, ...]:
    """Distinct leaf names of the (unwrapped) model's linear layers, output head included, in model order."""
    return tuple(dict.fromkeys(_leaf(path) for path, _, _ in _linear_layers(model)))


def _all_linear(model: torch.nn.Module) -> tuple[str, ...]:
    """What 'all-linear' means for this model: the linear layers' leaf names, the output head left out."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return tuple(
        dict.fromkeys(_leaf(path) for path, module, _ in _linear_layers(model) if module is not head)
    )


def _targeted_layers(model: torch.nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """(path, in, out) of every linear layer whose leaf name is a target ('all-linear' expanded)."""
    names = set(_all_linear(model) if tuple(target_modules) == (ALL_LINEAR,) else target_modules)
    return [
        (path, fan_in, fan_out)
        for path, _, (fan_in, fan_out) in _linear_layers(model)
        if _leaf(path) in names
    ]


def resolve_target_modules(model: torch.nn.Module, requested: tuple[str, ...]) -> tuple[str, ...]:
    """The concrete leaf names LoRA adapts: 'all-linear' expanded, or the names given, each checked.

    Server and nodes resolve on the same architecture, so PEFT's config, the fingerprint and the
    adapter keys agree whatever each side's quantization. Raises :class:`TargetModulesError`.
    """
    joined = ",".join(requested)
    present = linear_layer_names(model)
    if not present:
        raise TargetModulesError(
            f"lora.target-modules={joined!r}: this model has no linear layer LoRA can adapt "
            "(torch Linear, bitsandbytes Linear4bit/Linear8bitLt or transformers Conv1D)"
        )
    if tuple(requested) == (ALL_LINEAR,):
        chosen = _all_linear(model)
        if not chosen:
            raise TargetModulesError(
                f"lora.target-modules='{ALL_LINEAR}': this model's only linear layer is its output head "
                f"({', '.join(present)}); name it explicitly to adapt it"
            )
        return chosen
    if ALL_LINEAR in requested:
        raise TargetModulesError(
            f"lora.target-modules={joined!r} mixes '{ALL_LINEAR}' with module names: use '{ALL_LINEAR}' "
            "alone, or list module names only"
        )
    missing = [name for name in dict.fromkeys(requested) if name not in present]
    if missing or not requested:
        which = ", ".join(repr(name) for name in missing) or "no name"
        raise TargetModulesError(
            f"lora.target-modules={joined!r}: {which} {'matches' if len(missing) < 2 else 'match'} no linear "
            f"layer of this model; its linear layers are {', '.join(present)} "
            f"(name some of them, or use '{ALL_LINEAR}')"
        )
    return tuple(dict.fromkeys(requested))


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


def _stores_weights_transposed(model: torch.nn.Module, target_modules: tuple[str, ...]) -> bool:
    """True when the targets are GPT-2 ``Conv1D`` layers (full precision): PEFT then needs fan_in_fan_out.

    bitsandbytes replaces ``Conv1D`` by ``Linear4bit``/``Linear8bitLt`` when quantizing, and those
    store their weight (out, in) like any linear layer, so a quantized GPT-2 answers False.
    """
    from transformers.pytorch_utils import Conv1D

    names = set(target_modules)
    return any(
        isinstance(module, Conv1D) for path, module, _ in _linear_layers(model) if _leaf(path) in names
    )


def model_fingerprint(model: torch.nn.Module, target_modules: tuple[str, ...]) -> str:
    """A short hash of the architecture and of every LoRA target's shape.

    Two nodes with equal fingerprints can exchange adapters, whatever their quantization; weights
    are not hashed (that would read gigabytes), the shapes and names adapters depend on are.
    """
    config = getattr(model, "config", None)
    summary: dict[str, Any] = {
        key: getattr(config, key, None)
        for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")
    }
    summary["targets"] = sorted(_targeted_layers(model, target_modules))
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def count_target_modules(model: torch.nn.Module, target_modules: tuple[str, ...]) -> int:
    """How many linear layers LoRA would adapt; 0 means the target names do not fit this model."""
    return len(_targeted_layers(model, target_modules))


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
        self._fan_in_fan_out = _stores_weights_transposed(base, self.target_modules)
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
        """Make the rank-``rank`` adapter the trained and applied one, creating it (seeded) if new."""
        if rank not in self._slots:
            slot = AdapterSlot(name=f"rank{rank}", rank=rank, scale=self.lora.alpha / rank)
            torch.manual_seed(self.seed + rank)
            if self._model is None:
                from peft import get_peft_model

                self._model = get_peft_model(self._base, self._peft_config(rank), adapter_name=slot.name)
            else:
                self._model.add_adapter(slot.name, self._peft_config(rank))
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
