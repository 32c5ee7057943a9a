"""Which layers of a base model get a LoRA adapter: ``lora.target-modules`` resolved on its architecture.

``all-linear`` means every linear layer except the output head (PEFT's meaning), whatever the
architecture: torch ``Linear``, its bitsandbytes 4/8-bit subclasses, and GPT-2's ``Conv1D``. Server and
nodes resolve the names on the same architecture, so PEFT's config, the fingerprint and the adapter keys
agree whatever each side's quantization.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch

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


def targeted_layers(model: torch.nn.Module, target_modules: tuple[str, ...]) -> list[tuple[str, int, int]]:
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


def stores_weights_transposed(model: torch.nn.Module, target_modules: tuple[str, ...]) -> bool:
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
    summary["targets"] = sorted(targeted_layers(model, target_modules))
    digest = hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()
    return digest[:16]
