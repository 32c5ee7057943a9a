"""Block-wise quantization of flat float32 tensors: the pure math behind the 8- and 4-bit wire formats.

A flat tensor is cut into blocks of ``block_size`` elements (the last one may be partial). Each block
keeps one scale, its absolute maximum rounded *up* to a bfloat16 value, and each element keeps the index
of a level on a fixed grid in ``[-1, 1]``; the decoded element is ``grid[index] * scale``.

* ``absmax`` grids are uniform and symmetric: ``k / q`` for ``k`` in ``-q..q`` with ``q = 2**(bits-1) - 1``
  (255 levels at 8 bits, 15 at 4 bits), so zero is exact and the grid spacing is ``1 / q``.
* ``nf4`` is the 16-level NormalFloat grid of QLoRA, built here from its definition (normal quantiles,
  normalised to ``[-1, 1]``); it agrees with the table bitsandbytes uses for 4-bit base models to 2e-7.

Rounding is either stochastic (pick one of the two neighbouring levels with probability proportional
to closeness, so ``E[decoded] == x`` on any grid, uniform or not) or to the nearest level.

Scales are bfloat16 bit patterns (an ``int32`` tensor holding values ``0..0x7F7F``): bfloat16 has
float32's exponent range, so block maxima from ``1e-38`` to ``3e38`` are kept to within ``2**-7``
(relative), and numpy (which has no bfloat16) can carry them as ``uint16``. Rounding the scale up
means ``|x| / scale <= 1``: nothing is clipped, except in blocks whose maximum exceeds the largest
bfloat16 (about ``3.39e38``), whose values are clipped to it (relative error below ``2**-8``).
Float16 scales would overflow at 65504; float32 scales would cost 2 more bytes per block.
This module imports only torch.
"""

from __future__ import annotations

import torch

SCHEMES = ("absmax", "nf4")
# Largest finite bfloat16, as the upper 16 bits of a float32: sign 0, exponent 0xFE, mantissa 0x7F.
BF16_MAX_BITS = 0x7F7F
# Masks on a bfloat16 bit pattern: the sign bit, and the exponent that marks inf/nan when all ones.
BF16_SIGN_MASK = 0x8000
BF16_EXP_MASK = 0x7F80


def _build_nf4_grid() -> torch.Tensor:
    """The 16 NF4 levels from their definition: normal quantiles at evenly spaced probabilities.

    8 levels come from quantiles on the positive side and 7 from the negative side (so that zero is a
    level and the grid uses all 16 codes); the outermost probability is the midpoint between
    ``1 - 1/(2*15)`` and ``1 - 1/(2*16)``; the result is divided by its maximum.
    """
    outer = 0.5 * ((1 - 1 / (2 * 15)) + (1 - 1 / (2 * 16)))
    positive = torch.special.ndtri(torch.linspace(outer, 0.5, 9, dtype=torch.float64)[:-1])  # (8,)
    negative = -torch.special.ndtri(torch.linspace(outer, 0.5, 8, dtype=torch.float64)[:-1])  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values  # (16,)
    return (levels / levels.max()).to(torch.float32)


NF4_GRID = _build_nf4_grid()  # (16,), ascending, NF4_GRID[0] == -1, NF4_GRID[7] == 0, NF4_GRID[15] == 1


def grid(bits: int, scheme: str) -> torch.Tensor:
    """The ascending levels in ``[-1, 1]`` that codes index into; (n_levels,) float32."""
    if scheme == "nf4":
        if bits != 4:
            raise ValueError(f"scheme 'nf4' needs bits=4, got bits={bits}")
        return NF4_GRID
    if scheme != "absmax" or bits not in (8, 4):
        raise ValueError(f"no quantization grid for bits={bits}, scheme={scheme!r}")
    q = 2 ** (bits - 1) - 1
    return torch.arange(-q, q + 1, dtype=torch.float32) / q  # (2q + 1,)


def n_blocks(numel: int, block_size: int) -> int:
    """Number of blocks (the last may be partial) that ``numel`` elements occupy."""
    return -(-numel // block_size)


def scales_to_bf16_bits(absmax: torch.Tensor) -> torch.Tensor:
    """Non-negative finite float32 block maxima -> bfloat16 bit patterns of the next value >= each.

    (n_blocks,) float32 -> (n_blocks,) int32 in ``0..BF16_MAX_BITS``. Exact bfloat16 values stay put.
    """
    raw = absmax.contiguous().view(torch.int32)  # (n_blocks,), sign bit is 0 for x >= 0
    upper = raw >> 16
    upper = upper + ((raw & 0xFFFF) != 0).to(torch.int32)  # bump to the next bf16 when bits are lost
    return upper.clamp(max=BF16_MAX_BITS)


def bf16_bits_to_float(bits: torch.Tensor) -> torch.Tensor:
    """bfloat16 bit patterns held in int32 -> float32 values; (n,) -> (n,)."""
    return (bits.to(torch.int32) << 16).view(torch.float32)


def quantize(
    flat: torch.Tensor,
    bits: int,
    scheme: str,
    block_size: int,
    stochastic: bool,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize finite float32 values block by block.

    ``flat`` (numel,) -> (scale bits (n_blocks,) int32, codes (numel,) uint8 indices into ``grid``).
    """
    numel = flat.numel()
    blocks = n_blocks(numel, block_size)
    padded = torch.zeros(blocks * block_size, dtype=torch.float32)  # zeros never raise a block's max
    padded[:numel] = flat
    x = padded.view(blocks, block_size)  # (n_blocks, block_size)
    scale_bits = scales_to_bf16_bits(x.abs().amax(dim=1)) if blocks else torch.zeros(0, dtype=torch.int32)
    scale = bf16_bits_to_float(scale_bits).unsqueeze(1)  # (n_blocks, 1)
    # All-zero blocks have scale 0: map them to level 0 instead of dividing by zero.
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.where(scale > 0, x / safe, torch.zeros_like(x)).clamp_(-1.0, 1.0).reshape(-1)  # (padded,)

    levels = grid(bits, scheme)
    if scheme == "absmax":
        q = (levels.numel() - 1) // 2
        t = y * q  # (padded,) in [-q, q]; levels are k / q
        lower = t.floor().clamp_(-q, q - 1)
        frac = t - lower
        lower_index = (lower + q).to(torch.int64)
    else:
        lower_index = (torch.searchsorted(levels, y, right=True) - 1).clamp_(0, levels.numel() - 2)
        lo, hi = levels[lower_index], levels[lower_index + 1]
        frac = ((y - lo) / (hi - lo)).clamp_(0.0, 1.0)
    if stochastic:
        # P(up) = frac makes the expected level exactly y: lo + frac * (hi - lo).
        up = torch.rand(frac.shape, generator=generator) < frac
    else:
        up = frac >= 0.5
    codes = (lower_index + up.to(torch.int64)).to(torch.uint8)  # (padded,)
    return scale_bits, codes[:numel]


def dequantize(
    scale_bits: torch.Tensor, codes: torch.Tensor, bits: int, scheme: str, block_size: int
) -> torch.Tensor:
    """Inverse of :func:`quantize`: scale bits (n_blocks,) and codes (numel,) -> float32 (numel,).

    Callers validate codes (< number of levels) and scales (finite, non-negative) first.
    """
    numel = codes.numel()
    scales = bf16_bits_to_float(scale_bits)  # (n_blocks,)
    per_element = scales.repeat_interleave(block_size)[:numel]  # (numel,)
    # Levels are within [-1, 1], so level * scale cannot overflow float32.
    return grid(bits, scheme)[codes.to(torch.int64)] * per_element


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (numel,) uint8 -> (ceil(numel / 2),) uint8; element 2i low nibble, 2i+1 high."""
    if codes.numel() % 2:
        codes = torch.cat([codes, torch.zeros(1, dtype=torch.uint8)])
    pairs = codes.view(-1, 2)  # (ceil(numel / 2), 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> tuple[torch.Tensor, bool]:
    """Inverse of :func:`pack_nibbles`: (ceil(numel / 2),) -> (codes (numel,), padding nibble was zero)."""
    codes = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)  # (2 * len(packed),)
    clean_padding = codes.numel() == numel or int(codes[numel:].sum()) == 0
    return codes[:numel], clean_padding
