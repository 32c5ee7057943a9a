"""Decoder hardening: targeted malformed records get clear CodecErrors, and thousands of fuzzed records
either decode to finite float32 tensors of their declared shapes or raise CodecError, never anything else.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from pollen.codec import CodecError, WireSpec, decode, encode

SPECS = [
    WireSpec(32),
    WireSpec(16),
    WireSpec(8),
    WireSpec(8, block_size=2),
    WireSpec(4),
    WireSpec(4, block_size=7, stochastic=False),
    WireSpec(4, "nf4"),
    WireSpec(4, "nf4", block_size=3),
]


def _tensor_sets() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "layers.0.A": torch.randn(4, 16, generator=gen),
            "layers.0.B": torch.randn(16, 4, generator=gen) * 1e-3,
        },
        {
            "scalar": torch.tensor(1.5),
            "odd": torch.randn(7, generator=gen),
            "empty": torch.zeros(0, 3),
            "cube": torch.randn(2, 3, 5, generator=gen),
        },
        {
            "zeros": torch.zeros(9),
            "mixed": torch.cat([torch.randn(30, generator=gen) * 1e30, torch.zeros(5)]),
        },
    ]


def _base_records() -> list[ArrayRecord]:
    records = []
    for tensors in _tensor_sets():
        for spec in SPECS:
            if spec.bits == 16 and any(float(t.abs().max()) > 65504 for t in tensors.values() if t.numel()):
                continue
            records.append(encode(tensors, spec, torch.Generator().manual_seed(1)))
    return records


def _copy(record: ArrayRecord) -> ArrayRecord:
    out = ArrayRecord()
    for key, array in record.items():
        out[key] = Array(
            dtype=array.dtype, shape=tuple(array.shape), stype=array.stype, data=bytes(array.data)
        )
    return out


def _declared_shapes(record: ArrayRecord) -> dict[str, tuple[int, ...]]:
    """Names and shapes as the record's index states them (only called after a successful decode)."""
    fields = record["index"].data.split(b"\0")[:-1]
    shapes: dict[str, tuple[int, ...]] = {}
    previous = b""
    for name_field, shape_field in zip(fields[::2], fields[1::2], strict=True):
        shared, _, rest = name_field.partition(b":")
        previous = previous[: int(shared)] + rest
        shapes[previous.decode()] = (
            tuple(int(size) for size in shape_field.split(b"x")) if shape_field else ()
        )
    return shapes


def check(record: object) -> str:
    """The fuzzing invariant; returns 'decoded' or 'rejected'."""
    try:
        out = decode(record)  # type: ignore[arg-type]
    except CodecError as exc:
        message = str(exc)
        assert message and "\n" not in message
        assert "internal error" not in message, message  # an unforeseen exception slipped through
        return "rejected"
    assert isinstance(record, ArrayRecord)
    declared = _declared_shapes(record)
    assert list(out) == list(declared)
    for name, tensor in out.items():
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32
        assert tuple(tensor.shape) == declared[name]
        assert bool(torch.isfinite(tensor).all())
    return "decoded"


# --- targeted cases


def _with(record: ArrayRecord, key: str, **fields: object) -> ArrayRecord:
    record = _copy(record)
    for field, value in fields.items():
        setattr(record[key], field, value)
    return record


def _index(record: ArrayRecord, data: bytes) -> ArrayRecord:
    return _with(record, "index", data=data, shape=(len(data),))


def _header(record: ArrayRecord, position: int, value: int) -> ArrayRecord:
    words = np.frombuffer(record["header"].data, "<i4").copy()
    words[position] = value
    return _with(record, "header", data=words.tobytes())


def _u16(record: ArrayRecord, key: str, position: int, value: int) -> ArrayRecord:
    words = np.frombuffer(record[key].data, "<u2").copy()
    words[position] = value
    return _with(record, key, data=words.tobytes())


def _byte(record: ArrayRecord, key: str, position: int, value: int) -> ArrayRecord:
    data = bytearray(record[key].data)
    data[position] = value
    return _with(record, key, data=bytes(data))


Q4 = encode({"w": torch.randn(3, 7), "v": torch.ones(5)}, WireSpec(4))  # 21 + 5 elements, odd -> padding
Q8 = encode({"w": torch.randn(3, 7)}, WireSpec(8))
F32 = encode({"w": torch.randn(3, 7)}, WireSpec(32))
F16 = encode({"w": torch.randn(3, 7)}, WireSpec(16))


def _dropped(record: ArrayRecord, key: str) -> ArrayRecord:
    record = _copy(record)
    del record[key]
    return record


def _added(record: ArrayRecord, key: str) -> ArrayRecord:
    record = _copy(record)
    record[key] = Array(np.zeros(3, np.float32))
    return record


TARGETED: list[tuple[str, Callable[[], object], str]] = [
    ("not a record", lambda: {"header": 1}, "expected a flwr ArrayRecord, got dict"),
    ("config record", lambda: ConfigRecord({"a": 1}), "got ConfigRecord"),
    ("empty record", lambda: ArrayRecord(), "no 'header' array"),
    ("future version", lambda: _header(Q4, 0, 2), "codec version 2, this decoder reads version 1"),
    ("unknown bits", lambda: _header(Q4, 1, 12), "WireSpec.bits=12"),
    ("unknown scheme", lambda: _header(Q4, 2, 7), "scheme 7, expected 0 (absmax) or 1 (nf4)"),
    ("nf4 at 8 bits", lambda: _header(Q8, 2, 1), "'nf4' needs bits=4"),
    ("block too small", lambda: _header(Q4, 3, 1), "WireSpec.block_size=1"),
    ("negative count", lambda: _header(Q4, 4, -1), "-1 tensors"),
    ("count too high", lambda: _header(Q4, 4, 3), "expected a name and a shape for each of the 3 tensors"),
    (
        "short header",
        lambda: _with(Q4, "header", data=Q4["header"].data[:16], shape=(4,)),
        "4 entries, expected 5",
    ),
    ("header bytes vs shape", lambda: _with(Q4, "header", data=Q4["header"].data[:17]), "17 bytes"),
    ("header dtype", lambda: _with(Q4, "header", dtype="int64"), "dtype 'int64', expected 'int32'"),
    ("numpy stype", lambda: _with(Q4, "codes", stype="numpy.ndarray"), "stype 'numpy.ndarray', expected"),
    ("missing codes", lambda: _dropped(Q4, "codes"), "no 'codes' array"),
    ("missing scales", lambda: _dropped(Q8, "scales"), "no 'scales' array"),
    ("missing values", lambda: _dropped(F32, "values"), "no 'values' array"),
    ("missing index", lambda: _dropped(Q4, "index"), "no 'index' array"),
    ("extra array", lambda: _added(Q4, "bias"), "unexpected arrays ['bias']"),
    ("values in a 4-bit record", lambda: _added(Q4, "values"), "unexpected arrays ['values']"),
    ("short codes", lambda: _with(Q4, "codes", data=Q4["codes"].data[:-1], shape=(13,)), "holds 13 bytes"),
    ("scale count", lambda: _with(Q4, "scales", data=Q4["scales"].data[:-2], shape=(1,)), "holds 1 scales"),
    ("nan scale", lambda: _u16(Q4, "scales", 0, 0x7FC0), "'w' has a nan or inf block scale"),
    ("inf scale", lambda: _u16(Q4, "scales", 1, 0x7F80), "'v' has a nan or inf block scale"),
    ("negative scale", lambda: _u16(Q4, "scales", 0, 0xBF80), "'w' has a negative block scale"),
    (
        "absmax-4 code 15",
        lambda: _byte(Q4, "codes", 0, 0xFF),
        "code 15, but the 4-bit absmax grid has only 15",
    ),
    (
        "absmax-8 code 255",
        lambda: _byte(Q8, "codes", 2, 0xFF),
        "code 255, but the 8-bit absmax grid has only 255",
    ),
    ("padding nibble", lambda: _byte(Q4, "codes", 10, 0x77), "'w' has a non-zero padding nibble"),
    (
        "nan float32",
        lambda: _with(F32, "values", data=np.full(21, np.nan, "<f4").tobytes()),
        "'w' decodes to nan",
    ),
    (
        "inf float16",
        lambda: _with(F16, "values", data=np.full(21, np.inf, "<f2").tobytes()),
        "'w' decodes to nan",
    ),
    ("shape vs numel", lambda: _index(F32, b"0:w\x003x8\x00"), "holds 21 values, the shapes need 24"),
    ("negative size", lambda: _index(F32, b"0:w\x00-3x7\x00"), "'w' has shape b'-3x7'"),
    ("absurd size", lambda: _index(F32, b"0:w\x0099999x99999\x00"), "at most 2147483647 elements"),
    ("too many dims", lambda: _index(F32, b"0:w\x00" + b"1x" * 16 + b"21\x00"), "up to 16 decimal"),
    ("leading zero", lambda: _index(F32, b"0:w\x0003x7\x00"), "'w' has shape b'03x7'"),
    ("bad utf-8", lambda: _index(F32, b"0:\xff\x0021\x00"), "tensor #0 is not valid UTF-8"),
    ("empty name", lambda: _index(F32, b"0:\x0021\x00"), "tensor #0 has an empty name"),
    ("no prefix count", lambda: _index(F32, b"w\x0021\x00"), "name field of tensor #0 is b'w'"),
    ("prefix too long", lambda: _index(F32, b"1:w\x0021\x00"), "k at most 0"),
    ("repeated name", lambda: _index(Q4, b"0:w\x003x7\x001:\x005\x00"), "repeats the tensor name 'w'"),
    ("unterminated index", lambda: _index(F32, b"0:w\x003x7"), "holds 1 NUL-terminated fields"),
    ("data is str", lambda: _with(Q4, "codes", data="abc"), "holds str data, expected bytes"),
    ("shape is None", lambda: _with(Q4, "codes", shape=None), "shape None, expected a 1-d shape"),
]


@pytest.mark.parametrize(("case", "make", "fragment"), TARGETED, ids=[t[0] for t in TARGETED])
def test_malformed_record_gets_a_clear_codec_error(
    case: str, make: Callable[[], object], fragment: str
) -> None:
    with pytest.raises(CodecError) as info:
        decode(make())  # type: ignore[arg-type]
    assert fragment in str(info.value), f"{case}: {info.value}"
    assert check(make()) == "rejected"


def test_huge_declared_shape_is_rejected_before_allocating() -> None:
    # A few bytes claiming two billion elements: must fail on sizes, not try to allocate 8 GB.
    record = _index(F32, b"0:w\x002147483647\x00")
    with pytest.raises(CodecError, match="holds 21 values, the shapes need 2147483647"):
        decode(record)


def test_front_coded_names_cannot_expand_without_limit() -> None:
    # 6,000 entries of a few bytes each, every name one byte longer than the last: 18 MB of names.
    n = 6000
    index = b"".join(b"%d:x\x00\x00" % i for i in range(n))  # name i is "x" * (i + 1), 0-d tensors
    record = _header(_index(F32, index), 4, n)
    with pytest.raises(CodecError, match="names add up to more than 16777216 bytes"):
        decode(record)


# --- random fuzzing

DTYPES = ["float32", "float16", "uint8", "uint16", "int32", "int64", "bfloat16", "", "float64", "garbage"]
INTERESTING_INTS = [-(2**31), -1, 0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 32, 64, 255, 65536, 65537, 2**31 - 1]
SHAPE_TEXTS = [
    *(b"", b"0", b"1", b"-1", b"08", b"1x", b"x1", b"99999999999", b"2147483647x2", b"1x" * 16 + b"1"),
    *(b"\xef\xbc\x91", b"8 x 8", b"8x8x", b"3x7", b"7x3", b"21", b"5", b"0x0"),
]
NAME_FIELDS = [
    b"",
    b"0:",
    b"0:\xff\xfe",
    b"new",
    b"0:new",
    b"1:",
    b"99:x",
    b"-1:x",
    b"01:x",
    b"1:\x80",
    b"9:",
]
SPECIAL_U16 = [0x7F80, 0xFF80, 0x7FC0, 0xFFFF, 0x8000, 0x8001, 0x7F7F, 0x0001, 0x0000]
SPECIAL_FLOATS = [np.nan, np.inf, -np.inf, 65504.0, -0.0, 1e38, 3.4e38]


def _pick_key(rng: random.Random, record: ArrayRecord) -> str | None:
    keys = list(record.keys())
    return rng.choice(keys) if keys else None


def _random_bytes(rng: random.Random, n: int) -> bytes:
    return bytes(rng.getrandbits(8) for _ in range(n))


def _bytes_of(record: ArrayRecord, key: str) -> bytes:
    """The data of ``record[key]`` if it is there and still bytes, else b""."""
    data = record[key].data if key in record else b""
    return data if isinstance(data, bytes) else b""


ITEMSIZE = {"float32": 4, "float16": 2, "uint8": 1, "uint16": 2, "int32": 4, "int64": 8}


def _resync_shapes(record: ArrayRecord) -> None:
    """Make every Array's 1-d shape agree with its data again, so mutations reach the deeper checks."""
    for array in record.values():
        itemsize = ITEMSIZE.get(array.dtype) if isinstance(array.dtype, str) else None
        if itemsize and isinstance(array.data, bytes) and len(array.data) % itemsize == 0:
            array.shape = (len(array.data) // itemsize,)


def _mutate(rng: random.Random, record: ArrayRecord, donors: list[ArrayRecord], used: Counter) -> None:
    """Apply one random mutation to ``record`` in place."""
    key = _pick_key(rng, record) or ""
    kind = rng.choice(
        ["flip", "truncate", "extend", "garbage", "dtype", "shape", "stype", "data_type", "header", "scale",
         "value", "code", "index", "drop", "add", "swap", "donor"]
    )  # fmt: skip
    used[kind] += 1
    if not key:  # everything was dropped already: only adding makes sense
        kind = "add"
    array: Any = record[key] if key else None
    data = bytes(array.data) if key and isinstance(array.data, bytes) else b""
    if kind == "flip" and data:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        array.data = bytes(buf)
    elif kind == "truncate":
        array.data = data[: rng.randrange(len(data) + 1)]
    elif kind == "extend":
        array.data = data + _random_bytes(rng, rng.randint(1, 16))
    elif kind == "garbage":
        array.data = _random_bytes(rng, rng.choice([len(data), rng.randint(0, 64)]))
    elif kind == "dtype":
        array.dtype = rng.choice(DTYPES)
    elif kind == "shape":
        n = len(data)
        array.shape = rng.choice(
            [(), (0,), (-1,), (2**31 - 1,), (n // 2,), (1, n), (n + 1,), [n], None, ("a",)]
        )
    elif kind == "stype":
        array.stype = rng.choice(["numpy.ndarray", "", "pollen.raw2", None])
    elif kind == "data_type":
        array.data = rng.choice([data.decode("latin-1"), bytearray(data), memoryview(data), None, list(data)])
    elif kind == "header" and _bytes_of(record, "header") and len(record["header"].data) >= 20:
        words = np.frombuffer(record["header"].data[:20], "<i4").copy()
        position = rng.randrange(5)
        words[position] = rng.choice([*INTERESTING_INTS, int(words[position]) + rng.choice([-1, 1])])
        record["header"].data = words.tobytes() + record["header"].data[20:]
    elif kind == "scale" and len(_bytes_of(record, "scales")) >= 2:
        words = np.frombuffer(record["scales"].data[: len(record["scales"].data) // 2 * 2], "<u2").copy()
        words[rng.randrange(words.size)] = rng.choice(SPECIAL_U16)
        record["scales"].data = words.tobytes()
    elif kind == "value" and _bytes_of(record, "values") and record["values"].dtype in ("float32", "float16"):
        wire = "<f4" if record["values"].dtype == "float32" else "<f2"
        raw = record["values"].data
        values = np.frombuffer(
            raw[: len(raw) // np.dtype(wire).itemsize * np.dtype(wire).itemsize], wire
        ).copy()
        if values.size:
            with np.errstate(over="ignore"):
                values[rng.randrange(values.size)] = rng.choice(SPECIAL_FLOATS)
            record["values"].data = values.tobytes()
    elif kind == "code" and _bytes_of(record, "codes"):
        buf = bytearray(record["codes"].data)
        buf[rng.randrange(len(buf))] = rng.choice([0xFF, 0x0F, 0xF0, 0xEE, rng.getrandbits(8)])
        record["codes"].data = bytes(buf)
    elif kind == "index" and "index" in record and isinstance(record["index"].data, bytes):
        fields = record["index"].data.split(b"\0")
        if len(fields) > 1:
            position = rng.randrange(len(fields) - 1)
            if position % 2:  # a shape field
                fields[position] = rng.choice(SHAPE_TEXTS)
            else:  # a name field
                fields[position] = rng.choice([*NAME_FIELDS, fields[rng.randrange(len(fields))]])
        joined = b"\0".join(fields)
        if rng.random() < 0.2 and joined:
            cut = rng.randrange(len(joined))
            joined = joined[:cut] + rng.choice([b"\0", b""]) + joined[cut + 1 :]
        record["index"].data = joined
    elif kind == "drop":
        del record[key]
    elif kind == "add":
        dtype = rng.choice(DTYPES)
        record[rng.choice(["extra", "values", "scales", "codes", "header", "index", "w"])] = Array(
            dtype=dtype, shape=(rng.randint(0, 8),), stype=rng.choice(["pollen.raw", "numpy.ndarray"]),
            data=_random_bytes(rng, rng.randint(0, 40)),
        )  # fmt: skip
    elif kind == "swap":
        other = _pick_key(rng, record)
        if other is not None and other != key:
            array.data, record[other].data = record[other].data, array.data
    elif kind == "donor":
        donor = rng.choice(donors)
        donor_key = _pick_key(rng, donor)
        if donor_key is not None:
            source = donor[donor_key]
            record[donor_key] = Array(
                dtype=source.dtype, shape=tuple(source.shape), stype=source.stype, data=bytes(source.data)
            )


def test_fuzzed_records_decode_to_finite_declared_tensors_or_raise_codec_error() -> None:
    rng = random.Random(20240611)
    bases = _base_records()
    outcomes: Counter = Counter()
    used: Counter = Counter()
    for base in bases:  # every untouched base record decodes
        outcomes[check(base)] += 1
    assert outcomes["decoded"] == len(bases)
    for _ in range(1500):
        record = _copy(rng.choice(bases))
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            _mutate(rng, record, bases, used)
        if rng.random() < 0.7:
            _resync_shapes(record)
        outcomes[check(record)] += 1
    # Garbage that is not an ArrayRecord at all.
    junk: object
    for junk in [None, 0, "header", b"\0" * 8, {}, [], ConfigRecord()]:
        outcomes[check(junk)] += 1
    assert sum(outcomes.values()) >= 1000 + len(bases)
    assert outcomes["rejected"] > 700 and outcomes["decoded"] > 100 + len(bases), outcomes
    assert len(used) == 17, used  # every mutation kind was exercised
