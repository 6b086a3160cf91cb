"""The NumPy v2.0 sampler's shortcuts (runtime/sampler_v2.py) give the very bits of the computation they replace.

Tolerance: none. `guided_velocity` skips operations whose result is known (the third pass not run: u2 is u;
a text scale of 1) and the loop's `_Step` computes it in place; each is compared bit for bit (uint32 patterns,
so zeros' signs count) with the formula written out here, operation by operation, over values that include
+0, -0, ties and large magnitudes, and NaNs (kept NaN). The whole-run parity tests
(tests/test_runtime_sampler_v2.py) compare the loop with the torch reference."""

import numpy as np
import pytest

from osx.numeric import round_bf16
from osx.models_v2 import SamplerV2Config
from osx.runtime.sampler_v2 import _Step, condition, denoise, guided_velocity

F32 = np.float32


def bf16_values(shape, seed):
    """bf16 values (as a denoiser output rounded by the sampler) with zeros of both signs and equal pairs mixed in."""
    rng = np.random.default_rng(seed)
    a = round_bf16(rng.standard_normal(shape, dtype=F32) * F32(10) ** rng.integers(-3, 4, shape).astype(F32))
    a.flat[::7] = F32(0.0)
    a.flat[3::11] = F32(-0.0)
    return a


def written_out(c, u, u2, g_txt, g_img, dtype):
    """u2 + g_img*(u - u2) + g_txt*(c - u), every operation rounded as a torch tensor of `dtype` would be."""
    r = round_bf16 if dtype == "bf16" else (lambda a: a)
    return r(r(u2 + r(g_img * r(u - u2))) + r(F32(g_txt) * r(c - u)))


def bits(a):
    return np.ascontiguousarray(a, dtype=F32).view(np.uint32)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("g_txt", [7.5, 1.0, 0.0])
@pytest.mark.parametrize("g_img", [3.0, 1.0, 0.0, "ramp"])
def test_guidance_shortcuts_give_the_same_bits(dtype, g_txt, g_img):
    c, u = bf16_values((2, 96, 16), 1), bf16_values((2, 96, 16), 2)
    c[0, :8], u[0, :8] = F32(-0.0), F32(-0.0)  # -0 - -0 and -0 + -0: where a zero's sign could differ
    if g_img == "ramp":  # an i2v ramp as the loop hands it over: packed, bf16, >= 1
        g_img = round_bf16(np.linspace(1, 2.7, 96, dtype=F32)[None, :, None] * np.ones((2, 96, 16), F32))
    else:
        g_img = F32(g_img)
    want = written_out(c, u, u.copy(), g_txt, g_img, dtype)  # the third pass run: u2 a separate array of the same values
    assert np.array_equal(bits(guided_velocity(c, u, u, g_txt, g_img, dtype)), bits(want))  # u2 is u: skipped
    assert np.array_equal(bits(guided_velocity(c, u, u.copy(), g_txt, g_img, dtype)), bits(want))  # computed
    u2 = bf16_values((2, 96, 16), 3)  # an image-conditioned video: u2 differs, nothing is skipped but g_txt == 1
    assert np.array_equal(bits(guided_velocity(c, u, u2, g_txt, g_img, dtype)), bits(written_out(c, u, u2, g_txt, g_img, dtype)))


# NaN payloads the rounding's carry would turn into inf (low bits only) or wrap into -0 / +0 (a full mantissa)
ODD_NANS = np.array([0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFF8000], np.uint32).view(F32)


def test_in_place_step_keeps_every_nan():
    """`_Step` rounds without the NaN pass until a NaN from outside is in play. Two steps: the denoiser's output
    holds odd NaN payloads (and infs, whose difference makes the CPU's default NaN); then a clean output while
    the latent carries those NaNs. Each equals the written-out formula with round_bf16 (which puts NaNs back):
    NaN in the same places, the same bits elsewhere."""
    B, shape = 1, (1, 96, 16)
    step = _Step((2, 96, 16), "bf16")
    x = bf16_values(shape, 4)
    for k in range(2):
        v = np.concatenate([bf16_values(shape, 5 + k), bf16_values(shape, 6 + k)]) * F32(1.001)  # not yet bf16
        if k == 0:
            v[0, 0, :5], v[1, 1, :5] = ODD_NANS, ODD_NANS
            v[0, 2, 0], v[1, 2, 0] = np.inf, np.inf  # inf - inf
        c, u = round_bf16(v[:B]), round_bf16(v[B:])
        with np.errstate(invalid="ignore"):
            want = round_bf16(x + round_bf16(F32(-0.05) * written_out(c, u, u, 7.5, F32(3), "bf16")))
        with np.errstate(invalid="ignore"):
            got = step.euler(x.copy(), -0.05, step.velocity(v.copy(), B, ("c", "u"), 7.5, 3.0))
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).sum() >= 5 + 5 * (k == 0)
        assert np.array_equal(bits(got[~np.isnan(got)]), bits(want[~np.isnan(want)]))
        x = want


def test_loop_keeps_a_nan_of_the_starting_latent():
    """A NaN in the given noise with a full mantissa: x + 0 keeps its payload and the carry would make it -0;
    the loop sees it before the first step and keeps it NaN to the end (the denoiser here returns zeros)."""
    noise = np.zeros((1, 16, 1, 4, 4), F32)
    noise[0, 3, 0, 1, 2] = ODD_NANS[2]
    masks, masked = condition("t2v", noise.shape, [])
    txt, y = np.zeros((2, 4, 8), F32), np.zeros((2, 8), F32)
    out = denoise(lambda img, *_: np.zeros_like(img), noise, txt, y, masks=masks, masked_ref=masked, cond_type="t2v",
                  cfg=SamplerV2Config(num_steps=3))
    assert np.isnan(out[0, 3, 0, 1, 2]) and np.isnan(out).sum() == 1
