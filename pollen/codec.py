"""The wire codec: named float tensors <-> a self-describing, optionally quantized Flower ``ArrayRecord``.

Clients send LoRA factor deltas and the server sends adapters back through this codec; nothing is
pickled. Every tensor of a message is packed into a handful of Arrays (not one Array per tensor), so
the per-tensor cost is its name and shape only, and the number of Arrays does not grow with the model.

Record layout, codec version 1. Every Array has ``stype`` :data:`STYPE` (``"pollen.raw"``): ``data``
holds exactly the raw little-endian C-order bytes of an array of the stated ``dtype`` and 1-d ``shape``
(no ``.npy`` header; ``Array.numpy()`` therefore refuses these Arrays: use :func:`decode`).

===========  =======  ================================================================================
key          dtype    content
===========  =======  ================================================================================
``header``   int32    ``[version, bits, scheme, block_size, n_tensors]``; scheme 0 = absmax, 1 = nf4
``index``    uint8    per tensor, in order: name field, NUL, shape field, NUL. The name field is
                      ``<k>:<rest>``: the name is the first ``k`` bytes of the previous name (UTF-8)
                      followed by ``rest``, so ``...q_proj.A`` then ``...q_proj.B`` costs ``32:B``.
                      The shape field is ASCII decimal sizes joined by ``x`` (``128x8``; empty for 0-d)
``values``   float32  bits 32: every tensor flattened (C order) and concatenated, exact
             float16  bits 16: the same in float16 (encode rejects values beyond +-65504)
``scales``   uint16   bits 8/4: one bfloat16 bit pattern per block, ``ceil(numel / block_size)`` blocks
                      per tensor (blocks never span tensors)
``codes``    uint8    bits 8: one level index per element; bits 4: two per byte, low nibble first,
                      ``ceil(numel / 2)`` bytes per tensor (an odd tensor's last high nibble is zero)
===========  =======  ================================================================================

Names are front-coded because they repeat long module paths: a small adapter's tensors have about
1,000 elements, so a 33-byte name would otherwise be 6% of its 4-bit payload.
A 0-d tensor is a tensor with ``ndim`` 0 and one element; empty tensors and empty mappings are fine.
The quantization math (grids, stochastic rounding, bfloat16 scales) is in :mod:`pollen.quantize`.
``WireSpec.stochastic`` applies to bits 8 and 4 only; float16 rounds to nearest.
Decoding is strict: any inconsistency raises :class:`CodecError` naming the array or tensor, and sizes
are checked before anything is allocated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pollen import quantize

CODEC_VERSION: int = 1
STYPE = "pollen.raw"
HEADER_KEY = "header"
INDEX_KEY = "index"
VALUES_KEY = "values"
SCALES_KEY = "scales"
CODES_KEY = "codes"

BITS = (32, 16, 8, 4)
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 2, 65536
MAX_NDIM = 16
# 2**31 - 1: Flower's protobuf stores shapes as int32; also bounds any allocation a record can cause.
MAX_NUMEL = 2**31 - 1
FP16_MAX = 65504.0
# Front-coded names could expand a small index enormously; no real adapter needs more than this in all.
MAX_NAME_BYTES = 2**24
HEADER_LEN = 5  # version, bits, scheme, block_size, n_tensors
_MAX_SIZE_DIGITS = len(str(MAX_NUMEL))


class CodecError(ValueError):
    """A record could not be decoded: says what is wrong, where, and what was expected."""


@dataclass(frozen=True)
class WireSpec:
    """How tensors travel: raw float32/float16, or block-quantized to 8 or 4 bits."""

    bits: int = 32  # 32 (raw float32) | 16 (float16) | 8 | 4 (block quantized)
    scheme: str = "absmax"  # "absmax" (uniform grid) | "nf4" (NormalFloat levels; bits=4 only)
    block_size: int = 64  # elements per quantization block
    stochastic: bool = True  # unbiased stochastic rounding (bits 8/4); False rounds to nearest

    def __post_init__(self) -> None:
        problems = []
        if type(self.bits) is not int or self.bits not in BITS:
            problems.append(f"WireSpec.bits={self.bits!r} is not supported; accepted: 32, 16, 8, 4")
        if self.scheme not in quantize.SCHEMES:
            problems.append(f"WireSpec.scheme={self.scheme!r} is not supported; accepted: 'absmax', 'nf4'")
        elif self.scheme == "nf4" and self.bits != 4:
            problems.append(f"WireSpec.scheme='nf4' needs bits=4, got bits={self.bits!r}; use 'absmax'")
        if type(self.block_size) is not int or not MIN_BLOCK_SIZE <= self.block_size <= MAX_BLOCK_SIZE:
            problems.append(
                f"WireSpec.block_size={self.block_size!r} is not accepted; "
                f"use an integer from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )
        if not isinstance(self.stochastic, bool):
            problems.append(f"WireSpec.stochastic={self.stochastic!r} is not accepted; use True or False")
        if problems:
            raise ValueError("; ".join(problems))


# --- encode


def _raw(values: np.ndarray, dtype: str, little_endian: str) -> Array:
    """A 1-d numpy array -> an Array of its raw little-endian bytes."""
    data = np.ascontiguousarray(values, dtype=little_endian).tobytes()
    return Array(dtype=dtype, shape=(int(values.size),), stype=STYPE, data=data)


def _shared_prefix(left: bytes, right: bytes) -> int:
    """Length of the common prefix of two byte strings."""
    common = 0
    for a, b in zip(left, right, strict=False):  # stops at the shorter
        if a != b:
            break
        common += 1
    return common


def _described(spec: WireSpec, names: list[str], shapes: list[tuple[int, ...]]) -> ArrayRecord:
    """A record holding the ``header`` and the front-coded ``index`` of these names and shapes."""
    header = [CODEC_VERSION, spec.bits, quantize.SCHEMES.index(spec.scheme), spec.block_size, len(names)]
    index = bytearray()
    previous = b""
    name_bytes = 0
    for name, shape in zip(names, shapes, strict=True):
        raw_name = name.encode("utf-8")
        name_bytes += len(raw_name)
        if name_bytes > MAX_NAME_BYTES:
            raise ValueError(f"tensor names add up to more than {MAX_NAME_BYTES} bytes; shorten them")
        shared = _shared_prefix(previous, raw_name)
        shape_text = "x".join(str(size) for size in shape)
        index += b"%d:%s\0%s\0" % (shared, raw_name[shared:], shape_text.encode("ascii"))
        previous = raw_name
    record = ArrayRecord()
    record[HEADER_KEY] = _raw(np.asarray(header, dtype=np.int64), "int32", "<i4")
    record[INDEX_KEY] = _raw(np.frombuffer(bytes(index), dtype=np.uint8), "uint8", "u1")
    return record


def _checked_input(name: object, tensor: object) -> torch.Tensor:
    """Validate one input's name, type and size; return it flattened to float32 on CPU; (numel,)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise ValueError(f"tensor name {name!r} cannot be encoded: use a non-empty string without NUL bytes")
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise TypeError(f"tensor {shown(str(name))!r} is {kind}; the codec encodes float torch tensors")
    if tensor.dim() > MAX_NDIM or tensor.numel() > MAX_NUMEL or any(d > MAX_NUMEL for d in tensor.shape):
        raise ValueError(
            f"tensor {shown(name)!r} of shape {tuple(tensor.shape)} is too large for the wire format "
            f"(at most {MAX_NDIM} dimensions and {MAX_NUMEL} elements)"
        )
    return tensor.detach().to(device="cpu", dtype=torch.float32).reshape(-1)  # (numel,)


def _check_values(names: list[str], flats: list[torch.Tensor], everything: torch.Tensor, bits: int) -> None:
    """Refuse nan/inf anywhere, and values float16 cannot hold when bits=16; name the first culprit.

    Checked once over all tensors concatenated (few large ops), then per tensor only to name it.
    """
    finite = bool(torch.isfinite(everything).all())
    fits = bits != 16 or not everything.numel() or float(everything.abs().max()) <= FP16_MAX
    if finite and fits:
        return
    for name, flat in zip(names, flats, strict=True):
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"tensor {shown(name)!r} contains nan or inf; only finite values can be encoded")
        if not fits and flat.numel() and float(flat.abs().max()) > FP16_MAX:
            raise ValueError(
                f"tensor {shown(name)!r} has values up to {float(flat.abs().max()):.4g}, "
                f"beyond float16's +-{FP16_MAX:g}; "
                "use bits=32, or bits=8/4 whose block scales cover the float32 range"
            )


def encode(
    tensors: Mapping[str, torch.Tensor], spec: WireSpec, generator: torch.Generator | None = None
) -> ArrayRecord:
    """Encode named float tensors into an ArrayRecord as ``spec`` says (layout in the module docstring).

    Stochastic rounding draws from ``generator`` (torch's global generator when None), so the record
    is deterministic given its seed. Raises ValueError/TypeError on bad names or tensors.
    """
    if not isinstance(spec, WireSpec):
        raise TypeError(f"spec must be a WireSpec, got {type(spec).__name__}")
    flats = [_checked_input(name, tensor) for name, tensor in tensors.items()]
    everything = torch.cat(flats) if flats else torch.zeros(0)  # (total_numel,)
    _check_values(list(tensors), flats, everything, spec.bits)

    record = _described(spec, list(tensors), [tuple(t.shape) for t in tensors.values()])
    if spec.bits == 32:
        record[VALUES_KEY] = _raw(everything.numpy(), "float32", "<f4")
    elif spec.bits == 16:
        record[VALUES_KEY] = _raw(everything.numpy(), "float16", "<f2")
    else:
        scale_parts, code_parts = [], []
        for flat in flats:
            scale_bits, codes = quantize.quantize(
                flat, spec.bits, spec.scheme, spec.block_size, spec.stochastic, generator
            )
            scale_parts.append(scale_bits)  # (n_blocks,) int32 holding bf16 bits
            code_parts.append(quantize.pack_nibbles(codes) if spec.bits == 4 else codes)
        scales = torch.cat(scale_parts) if flats else torch.zeros(0, dtype=torch.int32)
        codes_all = torch.cat(code_parts) if flats else torch.zeros(0, dtype=torch.uint8)
        record[SCALES_KEY] = _raw(scales.numpy(), "uint16", "<u2")
        record[CODES_KEY] = _raw(codes_all.numpy(), "uint8", "u1")
    return record


# --- decode


def _array_bytes(record: ArrayRecord, key: str, dtype: str, itemsize: int) -> bytes:
    """The data of ``record[key]`` after checking that its fields describe a raw 1-d ``dtype`` array."""
    if key not in record:
        raise CodecError(f"record has no {key!r} array; expected the arrays made by pollen.codec.encode")
    array: Any = record[key]
    if not isinstance(array, Array):
        raise CodecError(f"{key!r} is a {type(array).__name__}, expected a flwr Array")
    if array.stype != STYPE:
        raise CodecError(f"{key!r} has stype {array.stype!r}, expected {STYPE!r}")
    if array.dtype != dtype:
        raise CodecError(f"{key!r} has dtype {array.dtype!r}, expected {dtype!r}")
    data = array.data
    if not isinstance(data, bytes):
        raise CodecError(f"{key!r} holds {type(data).__name__} data, expected bytes")
    shape = array.shape
    if not isinstance(shape, (tuple, list)) or len(shape) != 1 or not isinstance(shape[0], int):
        raise CodecError(f"{key!r} has shape {shape!r}, expected a 1-d shape")
    if len(data) != shape[0] * itemsize:
        raise CodecError(
            f"{key!r} has {len(data)} bytes but its shape {tuple(shape)} of {dtype} "
            f"needs {shape[0] * itemsize}"
        )
    return data


def _parse_header(record: ArrayRecord) -> tuple[WireSpec, int]:
    """Read and check ``header``: the wire spec and the number of tensors."""
    if HEADER_KEY not in record:
        raise CodecError(
            f"record has no {HEADER_KEY!r} array, so it was not made by pollen.codec.encode "
            f"(it holds {sorted(record.keys())[:5]})"
        )
    data = _array_bytes(record, HEADER_KEY, "int32", 4)
    words: list[int] = np.frombuffer(data, dtype="<i4").tolist()
    if not words or words[0] != CODEC_VERSION:
        found = words[0] if words else "nothing"
        raise CodecError(f"record has codec version {found}, this decoder reads version {CODEC_VERSION}")
    if len(words) != HEADER_LEN:
        raise CodecError(f"{HEADER_KEY!r} has {len(words)} entries, expected {HEADER_LEN}")
    _, bits, scheme_id, block_size, n_tensors = words
    if not 0 <= scheme_id < len(quantize.SCHEMES):
        raise CodecError(f"header names scheme {scheme_id}, expected 0 (absmax) or 1 (nf4)")
    try:
        spec = WireSpec(bits=bits, scheme=quantize.SCHEMES[scheme_id], block_size=block_size)
    except ValueError as exc:
        raise CodecError(f"header describes an invalid wire spec: {exc}") from None
    if n_tensors < 0:
        raise CodecError(f"header declares {n_tensors} tensors, expected a count >= 0")
    return spec, n_tensors


def _decimal(text: bytes) -> int | None:
    """Canonical ASCII decimal (no sign, no leading zeros) up to MAX_NUMEL -> int, else None."""
    canonical = text.isdigit() and len(text) <= _MAX_SIZE_DIGITS and (text == b"0" or text[:1] != b"0")
    return int(text) if canonical and int(text) <= MAX_NUMEL else None


def _parse_name(field: bytes, previous: bytes, position: int) -> bytes:
    """``b"<k>:<rest>"`` -> the first ``k`` bytes of ``previous`` followed by ``rest``."""
    shared_text, colon, rest = field.partition(b":")
    shared = _decimal(shared_text)
    if not colon or shared is None or shared > len(previous):
        raise CodecError(
            f"{INDEX_KEY!r}: the name field of tensor #{position} is {field[:80]!r}; expected '<k>:<rest>' "
            f"with k at most {len(previous)}, the length of the previous name"
        )
    return previous[:shared] + rest


def _parse_shape(text: bytes, name: str) -> tuple[int, ...]:
    """``b"128x8"`` -> (128, 8); ``b""`` -> (). Only canonical decimal sizes within the limits pass."""
    if not text:
        return ()
    sizes = [_decimal(part) for part in text.split(b"x")]
    shape = tuple(size for size in sizes if size is not None)
    if len(shape) != len(sizes) or len(shape) > MAX_NDIM or math.prod(shape) > MAX_NUMEL:
        raise CodecError(
            f"tensor {shown(name)!r} has shape {text[:80]!r} in {INDEX_KEY!r}; expected up to {MAX_NDIM} "
            f"decimal sizes joined by 'x' with at most {MAX_NUMEL} elements in all"
        )
    return shape


def _parse_index(record: ArrayRecord, count: int) -> tuple[list[str], list[tuple[int, ...]]]:
    """Read ``index``: ``count`` distinct non-empty UTF-8 names, each with its shape."""
    data = _array_bytes(record, INDEX_KEY, "uint8", 1)
    parts = data.split(b"\0")
    if parts[-1] != b"" or len(parts) - 1 != 2 * count:
        raise CodecError(
            f"{INDEX_KEY!r} holds {len(parts) - 1} NUL-terminated fields, expected a name and a shape "
            f"for each of the {count} tensors in the header"
        )
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    seen: set[str] = set()
    previous = b""
    name_bytes = 0
    for position in range(count):
        raw_name = _parse_name(parts[2 * position], previous, position)
        previous = raw_name
        name_bytes += len(raw_name)
        if name_bytes > MAX_NAME_BYTES:
            raise CodecError(f"{INDEX_KEY!r}: the names add up to more than {MAX_NAME_BYTES} bytes")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{INDEX_KEY!r}: the name of tensor #{position} is not valid UTF-8") from None
        if not name:
            raise CodecError(f"{INDEX_KEY!r}: tensor #{position} has an empty name")
        if name in seen:
            raise CodecError(f"{INDEX_KEY!r} repeats the tensor name {shown(name)!r}; names must be distinct")
        seen.add(name)
        names.append(name)
        shapes.append(_parse_shape(parts[2 * position + 1], name))
    return names, shapes


def _decode_raw(record: ArrayRecord, spec: WireSpec, total: int) -> torch.Tensor:
    """``values`` -> every tensor's values concatenated; (total,) float32."""
    dtype, itemsize = ("float32", 4) if spec.bits == 32 else ("float16", 2)
    data = _array_bytes(record, VALUES_KEY, dtype, itemsize)
    if len(data) != total * itemsize:
        raise CodecError(f"{VALUES_KEY!r} holds {len(data) // itemsize} values, the shapes need {total}")
    wire_dtype = "<f4" if spec.bits == 32 else "<f2"
    return torch.from_numpy(np.frombuffer(data, dtype=wire_dtype).astype(np.float32))


def _decode_quantized(
    record: ArrayRecord, spec: WireSpec, names: list[str], shapes: list[tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """``scales`` + ``codes`` -> one float32 tensor per name."""
    numels = [math.prod(shape) for shape in shapes]
    block_counts = [quantize.n_blocks(numel, spec.block_size) for numel in numels]
    code_bytes = [numel if spec.bits == 8 else (numel + 1) // 2 for numel in numels]
    scale_data = _array_bytes(record, SCALES_KEY, "uint16", 2)
    code_data = _array_bytes(record, CODES_KEY, "uint8", 1)
    if len(scale_data) != 2 * sum(block_counts):
        raise CodecError(
            f"{SCALES_KEY!r} holds {len(scale_data) // 2} scales, the shapes at block size "
            f"{spec.block_size} need {sum(block_counts)}"
        )
    if len(code_data) != sum(code_bytes):
        raise CodecError(
            f"{CODES_KEY!r} holds {len(code_data)} bytes, {spec.bits}-bit codes for the shapes need "
            f"{sum(code_bytes)}"
        )
    scale_bits = torch.from_numpy(np.frombuffer(scale_data, dtype="<u2").astype(np.int32))  # (blocks,)
    all_codes = torch.from_numpy(np.frombuffer(code_data, dtype=np.uint8).copy())  # (code bytes,)
    n_levels = quantize.grid(spec.bits, spec.scheme).numel()

    out: dict[str, torch.Tensor] = {}
    scale_pos = code_pos = 0
    for name, shape, numel, blocks, nbytes in zip(
        names, shapes, numels, block_counts, code_bytes, strict=True
    ):
        bits = scale_bits[scale_pos : scale_pos + blocks]  # (blocks,)
        packed = all_codes[code_pos : code_pos + nbytes]  # (nbytes,)
        scale_pos, code_pos = scale_pos + blocks, code_pos + nbytes
        if bool(((bits & quantize.BF16_EXP_MASK) == quantize.BF16_EXP_MASK).any()):
            raise CodecError(f"tensor {shown(name)!r} has a nan or inf block scale; scales must be finite")
        if bool((bits & quantize.BF16_SIGN_MASK).any()):
            raise CodecError(f"tensor {shown(name)!r} has a negative block scale; scales must be >= 0")
        if spec.bits == 4:
            codes, clean = quantize.unpack_nibbles(packed, numel)
            if not clean:
                raise CodecError(f"tensor {shown(name)!r} has a non-zero padding nibble after its last code")
        else:
            codes = packed
        if numel and int(codes.max()) >= n_levels:
            raise CodecError(
                f"tensor {shown(name)!r} has code {int(codes.max())}, but the {spec.bits}-bit {spec.scheme} "
                f"grid has only {n_levels} levels"
            )
        values = quantize.dequantize(bits, codes, spec.bits, spec.scheme, spec.block_size)  # (numel,)
        out[name] = values.reshape(shape)
    return out


def _decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    if not isinstance(record, ArrayRecord):
        raise CodecError(f"expected a flwr ArrayRecord, got {type(record).__name__}")
    spec, count = _parse_header(record)
    names, shapes = _parse_index(record, count)
    expected = {HEADER_KEY, INDEX_KEY, *((VALUES_KEY,) if spec.bits >= 16 else (SCALES_KEY, CODES_KEY))}
    unexpected = sorted(set(record.keys()) - expected)
    if unexpected:
        raise CodecError(
            f"record has unexpected arrays {unexpected[:5]}; a {spec.bits}-bit record has {sorted(expected)}"
        )
    if spec.bits < 16:
        # Finite by construction: levels lie in [-1, 1] and scales were checked finite.
        return _decode_quantized(record, spec, names, shapes)
    numels = [math.prod(shape) for shape in shapes]
    values = _decode_raw(record, spec, sum(numels))  # (total,)
    parts = values.split(numels)  # one flat (numel,) view per tensor
    if not bool(torch.isfinite(values).all()):
        culprit = next(
            name for name, part in zip(names, parts, strict=True) if not bool(torch.isfinite(part).all())
        )
        raise CodecError(f"tensor {shown(culprit)!r} decodes to nan or inf; send finite values")
    return {name: part.reshape(shape) for name, part, shape in zip(names, parts, shapes, strict=True)}


@dataclass(frozen=True)
class Layout:
    """What a record holds, read from its header and index alone: the wire spec, names and shapes."""

    spec: WireSpec
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def describe(record: ArrayRecord, max_tensors: int | None = None) -> Layout:
    """The layout of a record made by :func:`encode`, without reading or dequantizing its values.

    Cheap whatever the payload, so a receiver can check names, shapes and spec against what it expects
    before it decodes. ``max_tensors`` refuses a header declaring more tensors before the index is read.
    Raises :class:`CodecError` for anything malformed.
    """
    try:
        if not isinstance(record, ArrayRecord):
            raise CodecError(f"expected a flwr ArrayRecord, got {type(record).__name__}")
        spec, count = _parse_header(record)
        if max_tensors is not None and count > max_tensors:
            raise CodecError(f"header declares {count} tensors, more than the {max_tensors} expected")
        names, shapes = _parse_index(record, count)
    except CodecError:
        raise
    except Exception as exc:  # as in decode: a malformed payload must never crash the receiver
        raise CodecError(f"internal error while reading the layout ({type(exc).__name__}: {exc})") from exc
    return Layout(spec=spec, names=tuple(names), shapes=tuple(shapes))


def fp32_sized(layout: Layout) -> ArrayRecord:
    """A float32 record of ``layout``'s names and shapes (zeros): what the payload would weigh unquantized.

    Raw float32 bytes do not depend on the values, so byte accounting needs no decode.
    """
    spec = WireSpec(bits=32, block_size=layout.spec.block_size)
    record = _described(spec, list(layout.names), list(layout.shapes))
    record[VALUES_KEY] = Array(
        dtype="float32", shape=(layout.numel,), stype=STYPE, data=bytes(4 * layout.numel)
    )
    return record


def shown(name: str, limit: int = 80) -> str:
    """A tensor name as an error message shows it: cut to ``limit`` characters (names can be huge)."""
    return name if len(name) <= limit else f"{name[:limit]}... ({len(name)} characters)"


def decode(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode a record made by :func:`encode` into float32 tensors with their names and shapes.

    Raises :class:`CodecError` for anything malformed, and nothing else: an unforeseen failure is
    reported as an internal CodecError so a bad payload can never crash the receiver.
    """
    try:
        return _decode(record)
    except CodecError:
        raise
    except Exception as exc:  # a malformed payload must not crash the server; the message flags the bug
        raise CodecError(
            f"internal error while decoding ({type(exc).__name__}: {exc}); the record is unusable, and "
            "pollen.codec should have reported this more clearly"
        ) from exc


def roundtrip(
    tensors: Mapping[str, torch.Tensor], spec: WireSpec, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """``decode(encode(tensors, spec, generator))``: what the receiver will see."""
    return decode(encode(tensors, spec, generator))


def serialized_nbytes(record: ArrayRecord | ConfigRecord | MetricRecord | RecordDict) -> int:
    """Bytes of ``record`` as Flower's protobuf serde encodes it, measured on the real proto message."""
    # The one Flower import beyond record types, kept local: only byte accounting needs the serde.
    from flwr.common import serde

    if isinstance(record, ArrayRecord):
        return int(serde.array_record_to_proto(record).ByteSize())
    if isinstance(record, ConfigRecord):
        return int(serde.config_record_to_proto(record).ByteSize())
    if isinstance(record, MetricRecord):
        return int(serde.metric_record_to_proto(record).ByteSize())
    if isinstance(record, RecordDict):
        return int(serde.recorddict_to_proto(record).ByteSize())
    raise TypeError(
        f"serialized_nbytes measures ArrayRecord, ConfigRecord, MetricRecord or RecordDict, "
        f"got {type(record).__name__}"
    )
