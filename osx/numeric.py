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

    The rule of `to_bfloat16_bits`, kept in 32 bits (the samplers round every update: this is their per-step
    cost): add 0x7FFF plus the lowest kept bit, clear the low 16 bits (`round_bf16_into`)."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32)
    return round_bf16_into(x, np.empty_like(x)).reshape(shape)


def round_bf16_into(x: np.ndarray, out: np.ndarray, bias: np.ndarray | None = None, keep_nan: bool = True) -> np.ndarray:
    """`round_bf16(x)` written into `out` and returned, allocating nothing (a sampler's per-step buffers): five
    integer passes. x and out contiguous float32 of one shape; `out` may be x itself when `bias` is given (a
    uint32 scratch array of x's shape), else it must not share x's memory. Only NaNs can carry past 2^32 or
    into the exponent: where x holds any (its minimum is NaN) they are put back. `keep_nan=False` skips that
    pass, for values whose NaNs can only be the CPU's default NaN (made by arithmetic), which stays NaN."""
    bits, o = x.view(np.uint32), out.view(np.uint32)
    nan = np.isnan(x) if keep_nan and x.size and np.isnan(x.min()) else None
    saved = x[nan] if nan is not None else None
    round_bf16_bits(bits, o if bias is None else bias, o)
    if nan is not None:
        out[nan] = saved
    return out


def round_bf16_bits(bits: np.ndarray, bias: np.ndarray, out: np.ndarray) -> None:
    """The rounding on float32 bit patterns (uint32 arrays of one shape): out = (bits + 0x7FFF + bit 16 of bits)
    with the low 16 bits cleared. `bias` is scratch (it may be `out`, or out may be `bits`, not both); NaNs not
    kept (`round_bf16_into`)."""
    np.right_shift(bits, _U16, out=bias)  # uint32 constants: no Python-int conversion per operation
    np.bitwise_and(bias, _U1, out=bias)
    np.add(bias, _HALF, out=bias)
    np.add(bias, bits, out=out)
    np.bitwise_and(out, _HIGH, out=out)


def format_size(width: int, height: int, frames: int | None = None) -> str:
    """A video size in messages, always width first, as `--resolution` takes it: "854x480", "854x480, 102 frames"."""
    return f"{width}x{height}" + ("" if frames is None else f", {frames} frame{'s' * (frames != 1)}")


def format_bytes(n: float, digits: int = 1) -> str:
    """1536 -> "1.5 KiB": binary units, `digits` decimals (whole bytes below 1 KiB)."""
    units, k = ("B", "KiB", "MiB", "GiB"), 0
    while abs(n) >= 1024 and k < len(units) - 1:
        n, k = n / 1024, k + 1
    return f"{int(n)} B" if k == 0 else f"{n:.{digits}f} {units[k]}"
