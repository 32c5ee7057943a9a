"""Error feedback for quantized deltas: carry what quantization lost into the next round.

A client sends ``decoded = Q(delta + residual)`` and keeps ``residual' = (delta + residual) - decoded``.
Summed over rounds the residuals telescope, so the sum of what was sent equals the sum of the true
deltas minus the latest residual: the error stays bounded by one round's quantization error instead
of accumulating (deterministic rounding would otherwise drift whenever small values keep rounding the
same way).

Error feedback only makes sense for tensors that persist across rounds with the same meaning. If a
factor is re-initialised or re-projected each round (for example a fresh LoRA ``A`` per round), its old
residual describes a different tensor and must be dropped; callers decide which names to keep.
Pure torch; no Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def _check_shape(name: str, expected: torch.Tensor, got: torch.Tensor, what: str, hint: str) -> None:
    if expected.shape != got.shape:
        raise ValueError(
            f"{what} for {name!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}; {hint}"
        )


def compensate(
    delta: Mapping[str, torch.Tensor], residual: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``delta + residual`` per tensor, in float32: what to quantize and send this round.

    A name missing from ``residual`` (or ``residual=None``, the first round) counts as zero; residual
    names absent from ``delta`` are ignored (their tensors are not being sent). Raises ValueError if a
    residual's shape differs from its delta's.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in delta.items():
        value = value.detach().float()
        carried = None if residual is None else residual.get(name)
        if carried is None:
            out[name] = value.clone()
            continue
        hint = "drop a stale residual when a tensor changes shape (new rank)"
        _check_shape(name, value, carried, "the residual", hint)
        out[name] = value + carried.detach().to(device=value.device, dtype=torch.float32)
    return out


def new_residual(
    compensated: Mapping[str, torch.Tensor], decoded: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``compensated - decoded`` per tensor, in float32: what quantization lost, to add next round.

    ``decoded`` is what the receiver sees (e.g. :func:`pollen.codec.roundtrip` of ``compensated``), so
    both must hold the same names and shapes; anything else raises ValueError.
    """
    if compensated.keys() != decoded.keys():
        differing = sorted(set(compensated) ^ set(decoded))[:3]
        raise ValueError(f"compensated and decoded tensors have different names, e.g. {differing}")
    out: dict[str, torch.Tensor] = {}
    for name, value in compensated.items():
        value = value.detach().float()
        received = decoded[name]
        _check_shape(name, value, received, "the decoded tensor", "decode the record made from `compensated`")
        out[name] = value - received.detach().to(device=value.device, dtype=torch.float32)
    return out
