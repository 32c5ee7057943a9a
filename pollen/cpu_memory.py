"""CPU memory of a loaded 4-bit model: release the checkpoint file, return freed blocks to the OS.

Both matter only on the CPU (a GPU's memory is the CUDA allocator's); each is a no-op without glibc.
Measured in docs/BENCHMARKS.md (node memory).
"""

from __future__ import annotations

from typing import Any

import torch


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
    return_freed_heap()


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 64 * 1024  # glibc's initial threshold, kept fixed during a load instead of growing


def return_large_blocks_to_os() -> None:
    """Give every CPU allocation of 64 KiB or more its own mapping, so freeing it returns it to the OS.

    For a model load: glibc raises its mmap threshold each time a large block is freed, after which the
    load's full-precision temporaries come from the heap, where they interleave with the 4-bit weights
    kept and the heap never shrinks (docs/BENCHMARKS.md, node memory). The setting is process-wide and
    costs a page fault per page of every large block, so :func:`reuse_heap_after_load` ends it once the
    model is loaded; a no-op without glibc.
    """
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


HEAP_THRESHOLD_AFTER_LOAD_BYTES = 32 * 1024 * 1024  # the ceiling glibc's own dynamic threshold grows to


def reuse_heap_after_load() -> None:
    """After a load: serve blocks up to 32 MiB from the heap again, and return what the load freed.

    With every block of 64 KiB or more mapped on its own, each training step pays a page fault per page
    of its activations: SmolLM2-135M took 13.5 s per step instead of 6.7 s, for 1.4 GiB less at its peak
    (docs/BENCHMARKS.md, node memory). The heap a round leaves behind is handed back after it
    (:func:`return_freed_heap`).
    """
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD_AFTER_LOAD_BYTES)
    return_freed_heap()


def return_freed_heap() -> None:
    """Ask glibc to return freed heap pages to the OS, e.g. after a round (a no-op elsewhere)."""
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
