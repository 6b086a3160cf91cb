"""The NumPy v2.0 sampler's shortcuts (runtime/sampler_v2.py) give the very bits of the computation they replace.

Tolerance: none. `guided_velocity` skips operations whose result is known (the third pass not run: u2 is u;
a text scale of 1), and the loop unpacks its latent by a precomputed gather; each is compared bit for bit
(uint32 patterns, so zeros' signs count) with the formula written out here, operation by operation, over
values that include +0, -0, ties and large magnitudes. The whole-run parity tests (tests/test_runtime_sampler_v2.py)
compare the loop with the torch reference."""

import numpy as np
import pytest

from osx.numeric import round_bf16
from osx.runtime.sampler_v2 import guided_velocity, pack, unpack, unpacking

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


@pytest.mark.parametrize("shape", [(1, 16, 9, 8, 8), (2, 16, 3, 12, 4), (1, 4, 1, 2, 6)])
def test_unpacking_is_unpack(shape):
    B, C, T, H, W = shape
    x = np.random.default_rng(0).standard_normal(shape, dtype=F32)
    packed = pack(x)
    got = unpacking(packed.shape, T, H // 2, W // 2)(packed)
    want = unpack(packed, T, H // 2, W // 2)
    assert got.shape == want.shape == shape and np.array_equal(bits(got), bits(want)) and np.array_equal(got, x)
