"""Small numeric helpers every stage shares: bfloat16 rounding, byte counts and video sizes for messages (NumPy only)."""

from __future__ import annotations

import numpy as np

GIB = 1 << 30


def to_bfloat16_bits(a) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN.

    bf16 is the top 16 bits of a float32: add 0x7FFF plus the lowest kept bit, then keep the top 16 bits
    (torch's c10::BFloat16 round_to_nearest_even)."""
    a = np.asarray(a, dtype=np.float32)
    bits = np.ascontiguousarray(a).view(np.uint32).astype(np.uint64)
    out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def from_bfloat16_bits(u) -> np.ndarray:
    return (np.ascontiguousarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


_U1, _U16, _HALF, _HIGH = np.uint32(1), np.uint32(16), np.uint32(0x7FFF), np.uint32(0xFFFF0000)


def round_bf16(x) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even), returned as float32 of x's shape; NaN stays NaN.

    The rule of `to_bfloat16_bits`, kept in 32 bits and in place (the samplers round every update: this is
    their per-step cost): add 0x7FFF plus the lowest kept bit, clear the low 16 bits. Only NaNs can carry
    past 2^32 or into the exponent; they are put back afterwards."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    out = np.right_shift(bits, _U16)  # uint32 constants: no Python-int conversion per operation
    np.bitwise_and(out, _U1, out=out)
    np.add(out, _HALF, out=out)
    np.add(out, bits, out=out)
    np.bitwise_and(out, _HIGH, out=out)
    rounded = out.view(np.float32)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = x[nan]
    return rounded.reshape(shape)


def format_size(width: int, height: int, frames: int | None = None) -> str:
    """A video size in messages, always width first, as `--resolution` takes it: "854x480", "854x480, 102 frames"."""
    return f"{width}x{height}" + ("" if frames is None else f", {frames} frame{'s' * (frames != 1)}")


def format_bytes(n: float, digits: int = 1) -> str:
    """1536 -> "1.5 KiB": binary units, `digits` decimals (whole bytes below 1 KiB)."""
    units, k = ("B", "KiB", "MiB", "GiB"), 0
    while abs(n) >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{int(n)} B" if k == 0 else f"{n:.{digits}f} {units[k]}"
