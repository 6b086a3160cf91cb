"""Issue #18 item 9: prompt cleaning is linear in the prompt's length (the rewritten rules remove exactly
what Open-Sora's regexes remove), and the runtime caps the prompt's length before any work."""

import random
import re
import time

import pytest

from osx.errors import InputError
from osx.runtime import prompt, shim
from osx.runtime.request import MAX_PROMPT_CHARS, check_prompt

# Open-Sora's own patterns, which the runtime rewrote to avoid quadratic backtracking.
ORIGINAL = {
    "file names": (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),
    "sizes": (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    "spaced dots": (r"\s+\.\s+", " "),
}
ALPHABET = ["a", "b", "1", "9", ".", " ", "\n", "x", "×", "png", "jpeg", "jpg", ".mp4", "/", "-", "_", "@"]


def _rule(name: str):
    rules = prompt._AFTER_HTML + prompt._AFTER_FIX
    if name == "file names":
        return next(r for r in rules if callable(r))
    key = "[xх×]" if name == "sizes" else r"\s+\.\s+"
    return next(r for r in rules if not callable(r) and key in r[0])


@pytest.mark.parametrize("name", list(ORIGINAL))
def test_rewritten_rules_match_open_sora_on_fuzzed_text(name):
    pattern, repl = ORIGINAL[name]
    rule = _rule(name)
    rng = random.Random(18)
    for _ in range(3000):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30)))
        assert prompt._apply([rule], text) == re.sub(pattern, repl, text), repr(text)


ADVERSARIAL = ["a.", ".", "1", "a" + " " * 2, " ", "www.", "1.", "</a", "a.com@", "1x"]


@pytest.mark.parametrize("unit", ADVERSARIAL)
def test_cleaning_a_prompt_at_the_cap_is_quick(unit):
    # Before the rewrite, 10,000 characters of "a." took ~2.7 s and of spaces between words ~0.6 s
    # (quadratic); now each pattern at the cap takes tens of milliseconds. 1 s leaves room for a busy machine.
    text = "b" + unit * (MAX_PROMPT_CHARS // len(unit) - 1) + "c"
    t0 = time.perf_counter()
    prompt.prepare_prompt(text)
    assert time.perf_counter() - t0 < 1.0


def test_prompt_over_the_cap_is_refused_with_the_limit():
    check_prompt("x" * MAX_PROMPT_CHARS)
    with pytest.raises(InputError, match=f"at most {MAX_PROMPT_CHARS}") as e:
        check_prompt("x" * (MAX_PROMPT_CHARS + 1))
    assert "300 tokens" in e.value.hint


def test_a_1mb_prompt_through_the_shim_is_refused_at_once(tiny_bundle):
    handle = shim.open_bundle(str(tiny_bundle), '{"verify": false}')
    try:
        t0 = time.perf_counter()
        status, _, _ = shim.generate_to_buffer(handle, "a." * (1 << 19), "{}")
        seconds = time.perf_counter() - t0
        assert status == shim.ERR_INPUT and "at most" in shim.last_error()
        assert seconds < 0.5  # before: over 6 CPU-minutes, uncancellable
        status, _, _ = shim.generate_to_buffer(handle, "x", '{"negative_prompt": "' + "a." * (1 << 18) + '"}')
        assert status == shim.ERR_INPUT and "negative prompt" in shim.last_error()
    finally:
        shim.close(handle)
