"""Device, compute dtype and quantization settings, chosen in one place from config."""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(requested: str) -> torch.device:
    """'auto' -> CUDA when present, else CPU; a device this machine lacks fails with one line."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={requested!r} asks for CUDA but this machine has no usable CUDA device; "
            "use 'auto' or 'cpu'"
        )
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise RuntimeError(
            f"model.device={requested!r} asks for CUDA device {device.index}, but this machine has {count} "
            f"(cuda:0 to cuda:{count - 1}); use one of them, 'cuda' or 'auto'"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(
            f"model.device={requested!r} asks for Apple's Metal (MPS) backend, which this machine does not "
            "have; use 'auto' or 'cpu'"
        )
    return device


def resolve_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA (consumer GPUs run it fast), float32 elsewhere."""
    if requested == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[requested]


def quantization_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    """A transformers ``BitsAndBytesConfig`` for '4bit'/'8bit', or None for full precision.

    bitsandbytes is imported lazily so that ``import pollen`` stays fast and GPU-free.
    """
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"model.quantization={quantization!r} is not valid: expected '4bit', '8bit' or 'none'")
