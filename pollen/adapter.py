"""LoRA adapters as plain tensors: one factor pair per adapted module, with its scale.

A LoRA update of a linear layer is ``delta_W = scale * B @ A``. Pollen keeps the scale
(``lora_alpha / rank``) next to every pair, so aggregation math never assumes an alpha or a rank.
This module imports only torch, so strategies and the wire codec can use it as plain functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

# Suffixes PEFT uses in a state dict normalised by ``get_peft_model_state_dict``.
_A_SUFFIX = ".lora_A.weight"
_B_SUFFIX = ".lora_B.weight"
# Prefix PEFT adds in front of the base model's own module names.
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA update, ``delta_W = scale * b @ a``."""

    a: torch.Tensor  # (rank, in_features)
    b: torch.Tensor  # (out_features, rank)
    scale: float  # lora_alpha / rank, as PEFT applies it

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ValueError(
                f"LoRA factors must be matrices; got A of shape {tuple(self.a.shape)} "
                f"and B of shape {tuple(self.b.shape)}"
            )
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(
                f"LoRA rank mismatch: A has {self.a.shape[0]} rows but B has {self.b.shape[1]} "
                "columns; both must equal the rank"
            )

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def product(self) -> torch.Tensor:
        """The dense update ``scale * B @ A``; (out_features, in_features). For tests and small layers."""
        return self.scale * (self.b @ self.a)


# An adapter: module path (e.g. "model.layers.0.self_attn.q_proj") -> its factor pair.
Adapter = dict[str, LoraFactors]


def adapter_from_state_dict(state: Mapping[str, torch.Tensor], scale: float) -> Adapter:
    """Group a PEFT adapter state dict (``...lora_A.weight`` / ``...lora_B.weight``) into factor pairs."""
    adapter: Adapter = {}
    for key, a in state.items():
        if not key.endswith(_A_SUFFIX):
            continue
        stem = key[: -len(_A_SUFFIX)]
        b_key = stem + _B_SUFFIX
        if b_key not in state:
            raise KeyError(f"adapter state has {key!r} but no matching {b_key!r}")
        module = stem[len(PEFT_PREFIX) :] if stem.startswith(PEFT_PREFIX) else stem
        adapter[module] = LoraFactors(
            a=a.detach().float().clone(), b=state[b_key].detach().float().clone(), scale=scale
        )
    unpaired = [k for k in state if k.endswith(_B_SUFFIX) and k[: -len(_B_SUFFIX)] + _A_SUFFIX not in state]
    if unpaired:
        raise KeyError(f"adapter state has B factors without A factors: {unpaired[:3]}")
    return adapter


def adapter_to_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Inverse of :func:`adapter_from_state_dict`: PEFT state-dict keys, scales dropped."""
    state: dict[str, torch.Tensor] = {}
    for module, pair in adapter.items():
        state[PEFT_PREFIX + module + _A_SUFFIX] = pair.a.contiguous()
        state[PEFT_PREFIX + module + _B_SUFFIX] = pair.b.contiguous()
    return state


def flatten(adapter: Adapter) -> dict[str, torch.Tensor]:
    """Adapter -> flat tensors keyed ``<module>.A`` / ``<module>.B``, the form that goes on the wire."""
    flat: dict[str, torch.Tensor] = {}
    for module, pair in adapter.items():
        flat[module + ".A"] = pair.a
        flat[module + ".B"] = pair.b
    return flat


def unflatten(flat: Mapping[str, torch.Tensor], scale: float) -> Adapter:
    """Inverse of :func:`flatten`; every pair gets ``scale``. Raises KeyError on an unpaired factor."""
    modules = sorted({k[:-2] for k in flat if k.endswith((".A", ".B"))})
    stray = [k for k in flat if not k.endswith((".A", ".B"))]
    if stray:
        raise KeyError(f"unexpected adapter tensor names {stray[:3]}: every name must end in .A or .B")
    adapter: Adapter = {}
    for module in modules:
        if module + ".A" not in flat or module + ".B" not in flat:
            raise KeyError(f"module {module!r} is missing its A or B factor")
        adapter[module] = LoraFactors(a=flat[module + ".A"], b=flat[module + ".B"], scale=scale)
    return adapter


def sorted_modules(adapter: Adapter) -> Adapter:
    """``adapter`` with its modules in sorted order, the order :func:`unflatten` gives."""
    return {module: adapter[module] for module in sorted(adapter)}


def add(left: Adapter, right: Adapter, alpha: float = 1.0) -> Adapter:
    """Factor-wise ``left + alpha * right`` (same modules, shapes and scales); scales of ``left`` kept."""
    if left.keys() != right.keys():
        missing = sorted(set(left) ^ set(right))[:3]
        raise KeyError(f"adapters cover different modules, e.g. {missing}")
    return {
        m: LoraFactors(
            a=left[m].a + alpha * right[m].a, b=left[m].b + alpha * right[m].b, scale=left[m].scale
        )
        for m in left
    }


def subtract(left: Adapter, right: Adapter) -> Adapter:
    """Factor-wise ``left - right``: the delta a client sends after training."""
    return add(left, right, alpha=-1.0)


def with_scale(adapter: Adapter, scale_for_rank: float) -> Adapter:
    """The same products with every pair's scale set to ``scale_for_rank / rank`` (i.e. ``alpha / r``).

    ``scale_for_rank`` is LoRA's alpha: PEFT applies ``alpha / r``, so factors computed under another
    scale convention get their B rescaled to keep ``scale * B @ A`` unchanged.
    """
    out: Adapter = {}
    for module, pair in adapter.items():
        target = scale_for_rank / pair.rank
        out[module] = LoraFactors(a=pair.a, b=pair.b * (pair.scale / target), scale=target)
    return out


# The lossless stored form of an adapter (server checkpoints, Flower strategy hooks): fp32 factors keyed
# ``<module>.A`` / ``<module>.B`` plus ``<module>.scale``, a one-element float64 tensor. Never sent to nodes.
SCALE_SUFFIX = ".scale"


def to_stored(adapter: Adapter) -> dict[str, torch.Tensor]:
    """``adapter`` as stored: fp32 factors and each pair's exact scale, so a reload changes nothing."""
    tensors = {k: v.detach().float().contiguous() for k, v in flatten(adapter).items()}
    for module, pair in adapter.items():
        tensors[module + SCALE_SUFFIX] = torch.tensor([pair.scale], dtype=torch.float64)
    return tensors


def from_stored(tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """Inverse of :func:`to_stored`; KeyError naming the module whose scale or factor is missing."""
    factors = {k: v for k, v in tensors.items() if not k.endswith(SCALE_SUFFIX)}
    adapter = unflatten(factors, scale=1.0)
    extra = sorted(
        k[: -len(SCALE_SUFFIX)]
        for k in tensors
        if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in adapter
    )
    if extra:
        raise KeyError(f"stored adapter has scales without factors: {extra[:3]}")
    out: Adapter = {}
    for module, pair in adapter.items():
        if module + SCALE_SUFFIX not in tensors:
            raise KeyError(f"stored adapter lacks {module + SCALE_SUFFIX!r}")
        out[module] = LoraFactors(a=pair.a, b=pair.b, scale=float(tensors[module + SCALE_SUFFIX].item()))
    return out
