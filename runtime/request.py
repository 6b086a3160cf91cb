"""Bounds on a generation request, in one place: the CLI, the shim and `osx serve` all go through
`Pipeline.prepare_request`, which calls `check_values` here and then checks the shape against the
bundle. Every refusal is an InputError saying what was wrong, what is allowed and how to fix it.

Limits (README "Set up" lists them):
  prompt, negative prompt  at most MAX_PROMPT_CHARS characters. T5 reads 300 tokens (about 1,500
                           characters of English); the tokenizer drops the rest anyway, and the cap
                           keeps caption cleaning of hostile text short.
  steps                    1 .. the scheduler's num_timesteps (1000 for Open-Sora): more steps than
                           training timesteps only repeat work.
  guidance_scale           0 .. MAX_GUIDANCE_SCALE (Open-Sora uses 7); finite.
  fps                      (0, MAX_FPS]
  seed                     0 .. 2**63 - 1
  extend                   0 .. MAX_EXTEND clips appended by video extension (each one a full generation)
  frames, width, height    integers; their ranges come from the bundle (Pipeline.supported()).
"""

from __future__ import annotations

import math
import operator

from osx.errors import InputError

MAX_PROMPT_CHARS = 10_000
MAX_GUIDANCE_SCALE = 100.0
MAX_FPS = 1000.0
MAX_SEED = 2**63 - 1
MAX_EXTEND = 16  # each extension clip is a whole generation: bounds the work one request asks for
MAX_SIZE = 1 << 20  # frames or pixels: beyond any model; keeps the shape arithmetic and messages small


def check_prompt(text: str | None, what: str = "prompt") -> None:
    if text is None:
        return
    if not isinstance(text, str):
        raise InputError(f"the {what} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"the {what} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted",
                         hint="shorten it: the text encoder reads only its first 300 tokens (about 1,500 characters)")


def as_int(name: str, value) -> int:
    """`value` as an int (bool and non-integral floats refused), or InputError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        if isinstance(value, float) and value.is_integer():
            return int(value)
        return operator.index(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"{name}={_show(value)} is not a whole number") from None


def as_size(name: str, value) -> int:
    """A frame count or pixel size: a whole number of plausible magnitude (the bundle's ranges are
    checked later, with a message listing them)."""
    n = as_int(name, value)
    if abs(n) > MAX_SIZE:
        raise InputError(f"{name}={_show(n)} is far outside any bundle's range", hint="see `osx bundle info BUNDLE`")
    return n


def as_float(name: str, value, low: float, high: float, *, low_open: bool = False) -> float:
    """`value` as a finite float in [low, high] ((low, high] with low_open), or InputError."""
    try:
        if isinstance(value, bool):
            raise TypeError
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        x = math.nan
    if not (math.isfinite(x) and (low < x if low_open else low <= x) and x <= high):
        raise InputError(f"{name}={_show(value)} is outside {'(' if low_open else '['}{low:g}, {high:g}]",
                         hint=f"pass a {name} in that range")
    return x


def check_int_range(name: str, n: int, low: int, high: int, hint: str | None = None) -> int:
    if not low <= n <= high:
        raise InputError(f"{name}={_show(n)} is outside {low}..{high}", hint=hint or f"pass a {name} in that range")
    return n


def _show(value) -> str:
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit for str()
        return f"a {value.bit_length()}-bit number"
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"
