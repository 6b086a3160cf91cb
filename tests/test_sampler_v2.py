"""The v2.0 sampler: schedule against the doc's formula at the documented settings, oscillation, the i2v
ramps, the conditioning for every cond_type, the guidance identities and the redundant pass."""

import math

import numpy as np
import pytest
import torch

from osx.errors import InputError
from osx.export.init import seeded_init_
from osx.export.mmdit import MMDiT, pack, unpack, video_rope
from osx.export.sampler_v2 import condition, denoise, image_scale, oscillation, schedule, shift_alpha
from osx.models_v2 import OPENSORA_V2_0, OPENSORA_V2_0_TINY, SamplerV2Config, image_size, latent_shape

F32 = np.float32
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- schedule --------------------------------------------------------------------------------------------


def doc_schedule(height: int, width: int, frames: int, steps: int = 50) -> np.ndarray:
    """shared/design/opensora-v2.0.md 5.2, evaluated directly in float32 (Open-Sora's dtype):
    seq = (z_H*z_W)/4 with z_H = 2*ceil(H/16); alpha = (1 + (2/3840)*(seq - 256)) * sqrt(T_lat);
    t_i = 1 - i/steps (as torch's linspace kernel rounds it: from 1 in the first half, from 0 in the second);
    t'_i = alpha*t_i / (1 + (alpha - 1)*t_i)."""
    seq = (2 * math.ceil(height / 16)) * (2 * math.ceil(width / 16)) // 4
    t_lat = (frames - 1) // 4 + 1
    alpha = (1 + (2 / 3840) * (seq - 256)) * math.sqrt(t_lat)
    d = F32(-1) / F32(steps)
    t = [F32(1) + F32(i) * d if i < (steps + 1) // 2 else F32(0) - F32(steps - i) * d for i in range(steps + 1)]
    return np.array([F32(alpha) * v / (F32(1) + F32(alpha - 1) * v) for v in t], dtype=F32)


@pytest.mark.parametrize("resolution", ["256px", "768px"])
@pytest.mark.parametrize("aspect", ["16:9", "1:1"])
@pytest.mark.parametrize("frames", [33, 65, 129])
def test_schedule_matches_the_doc_formula(resolution, aspect, frames):
    H, W = image_size(OPENSORA_V2_0, resolution, aspect)
    C, T, h, w = latent_shape(OPENSORA_V2_0, H, W, frames)
    got = np.array(schedule(OPENSORA_V2_0.sampler, 50, h * w // 4, T), dtype=F32)
    want = doc_schedule(H, W, frames)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert got[0] == 1 and got[-1] == 0 and np.all(np.diff(got) < 0)


def test_schedule_examples_of_the_doc():
    sampler = OPENSORA_V2_0.sampler
    assert shift_alpha(sampler, 252, 33) == pytest.approx(5.7326, abs=1e-4)
    assert shift_alpha(sampler, 256, 33) == pytest.approx(5.7446, abs=1e-4)
    assert shift_alpha(sampler, 2304, 33) == pytest.approx(11.8721, abs=1e-4)
    t = schedule(sampler, 50, 252, 33)
    assert t[:4] == pytest.approx([1, 0.99645, 0.99278, 0.98899], abs=5e-6)
    assert t[-4:] == pytest.approx([0.26789, 0.19281, 0.10474, 0], abs=5e-6)
    t = schedule(sampler, 50, 2304, 33)
    assert t[:3] == pytest.approx([1, 0.99828, 0.99650], abs=5e-6)
    assert t[-4:] == pytest.approx([0.43110, 0.33096, 0.19503, 0], abs=5e-6)
    # torch.linspace on a CPU may round a few entries one float32 step apart (SIMD path); never more
    a = shift_alpha(sampler, 252, 33)
    lin = torch.linspace(1, 0, 51)
    t = schedule(sampler, 50, 252, 33)
    assert np.abs(np.array(t) - (a * lin / (1 + (a - 1) * lin)).numpy()).max() <= 2.0**-23 * 2


def test_flow_shift_and_no_shift():
    fixed = SamplerV2Config(flow_shift=3.0)
    assert shift_alpha(fixed, 252, 33) == 3.0
    flat = schedule(SamplerV2Config(shift=False), 4, 252, 33)
    assert flat == [1.0, 0.75, 0.5, 0.25, 0.0]


# --- guidance scales ---------------------------------------------------------------------------------------


def test_oscillation_rule():
    scales = [oscillation(7.5, i, 10) for i in range(50)]
    assert scales[:11] == [7.5] * 11
    ones = [i for i, s in enumerate(scales) if s == 1.0]
    assert ones == list(range(11, 50, 2)) and len(ones) == 20


@pytest.mark.parametrize("cond_type", ["i2v_head", "i2v_tail", "i2v_loop"])
def test_i2v_ramp(cond_type):
    cfg, steps, T = OPENSORA_V2_0.sampler, 50, 9
    for i in (0, 7, 10, 20, 49):
        g = oscillation(3.0, i, 10)
        ramp = image_scale(cfg, g, i, steps, T, cond_type)
        if g == 1.0:
            assert ramp == 1.0  # no ramp on oscillation steps
            continue
        upper = g - (g - 1) * i / steps  # falls over the steps ...
        want = [1 + (upper - 1) * k / (T - 1) for k in range(T)]  # ... and grows over the latent frames
        np.testing.assert_allclose(ramp, want, rtol=1e-6, atol=1e-6)
        assert ramp[0] == 1.0  # frame 0 gets 1 whichever end is conditioned


@pytest.mark.parametrize("cond_type", ["t2v", "v2v_head", "v2v_tail"])
def test_no_ramp_outside_i2v(cond_type):
    assert image_scale(OPENSORA_V2_0.sampler, 3.0, 0, 50, 9, cond_type) == 3.0


# --- conditioning --------------------------------------------------------------------------------------


def test_condition_per_cond_type():
    T = 20
    shape = (2, 16, T, 2, 2)
    img_head, img_tail = torch.randn(2, 16, 1, 2, 2), torch.randn(2, 16, 1, 2, 2)
    video = torch.randn(2, 16, 17, 2, 2)  # 65 video frames encoded
    expect = {  # cond_type: (references, {latent frame: what masked_ref holds there})
        "t2v": ([], {}),
        "i2v_head": ([img_head], {0: img_head[:, :, 0]}),
        "i2v_tail": ([img_tail], {T - 1: img_tail[:, :, -1]}),
        "i2v_loop": ([img_head, img_tail], {0: img_head[:, :, 0], T - 1: img_tail[:, :, -1]}),
        "v2v_head": ([video], {k: video[:, :, k] for k in range(9)}),
        "v2v_tail": ([video], {T - 9 + k: video[:, :, 17 - 9 + k] for k in range(9)}),
        "v2v_head_easy": ([video], {k: video[:, :, k] for k in range(17)}),
        "v2v_tail_easy": ([video], {T - 17 + k: video[:, :, k] for k in range(17)}),
    }
    for cond_type, (refs, frames) in expect.items():
        masks, masked = condition(cond_type, shape, refs)
        assert masks.shape == (2, 1, T, 2, 2) and masked.shape == shape
        for k in range(T):
            if k in frames:
                assert masks[:, :, k].eq(1).all() and torch.equal(masked[:, :, k], frames[k]), (cond_type, k)
            else:
                assert masks[:, :, k].eq(0).all() and masked[:, :, k].eq(0).all(), (cond_type, k)


def test_condition_refusals():
    with pytest.raises(InputError, match="unknown cond_type"):
        condition("v2v_head_half", (1, 16, 9, 2, 2), [])
    with pytest.raises(InputError, match="takes 1 reference"):
        condition("i2v_head", (1, 16, 9, 2, 2), [])
    with pytest.raises(InputError, match="at least 17 latent frames"):
        condition("v2v_head_easy", (1, 16, 20, 2, 2), [torch.randn(1, 16, 9, 2, 2)])
    with pytest.raises(InputError, match="conditions 17 latent frames"):
        condition("v2v_tail_easy", (1, 16, 9, 2, 2), [torch.randn(1, 16, 17, 2, 2)])
    # an image (one latent frame) is never conditioned, as in Open-Sora
    masks, _ = condition("i2v_head", (1, 16, 1, 2, 2), [torch.randn(1, 16, 1, 2, 2)])
    assert masks.eq(0).all()


# --- the loop --------------------------------------------------------------------------------------------

CFG = OPENSORA_V2_0_TINY
L = 8


@pytest.fixture(scope="module")
def model():
    return seeded_init_(MMDiT(CFG.mmdit), seed=1).eval()


def text_rows(B=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randn(B, L, CFG.mmdit.context_in_dim, generator=g)
    neg = torch.randn(B, L, CFG.mmdit.context_in_dim, generator=g)
    yp, yn = torch.randn(B, CFG.mmdit.vec_in_dim, generator=g), torch.randn(B, CFG.mmdit.vec_in_dim, generator=g)
    return torch.cat([prompt, neg, neg]), torch.cat([yp, yn, yn])


def run(model, cond_type="t2v", refs=(), steps=12, **kw):
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5)).to(BF16)
    masks, masked = condition(cond_type, tuple(noise.shape), list(refs))
    txt, y = text_rows()
    return denoise(model, noise, txt, y, masks=masks, masked_ref=masked, cond_type=cond_type,
                   cfg=CFG.sampler, num_steps=steps, **kw)


def explicit_loop(model, noise, txt, y, masks, masked, cond_type, steps, g_txt, g_img):
    """The loop of shared/design/opensora-v2.0.md 5.3 written out on unpacked latents, bf16 throughout."""
    cfg = CFG.sampler
    B, C, T, h, w = noise.shape
    t = doc_schedule(8 * h, 8 * w, 4 * (T - 1) + 1, steps) if cfg.shift else None
    cos, sin = video_rope(CFG.mmdit, L, T, h // 2, w // 2)
    x = noise.to(BF16)
    cond = pack(torch.cat([masks, masked], 1)).to(BF16)
    for i in range(steps):
        tv = torch.full((3 * B,), float(t[i]), dtype=BF16)
        out = model(pack(torch.cat([x, x, x])), txt, tv, y, torch.cat([cond, cond, torch.zeros_like(cond)]), cos, sin)
        c, u, u2 = unpack(out.to(BF16), T, h // 2, w // 2).chunk(3)
        gt = g_txt if i < 10 or i % 2 == 0 else 1.0
        gi = g_img if i < 10 or i % 2 == 0 else 1.0
        if gi > 1 and "i2v" in cond_type:
            upper = torch.linspace(gi, 1.0, steps + 1)[i]
            gi = torch.linspace(1.0, upper.item(), T)[None, None, :, None, None].expand(B, C, T, h, w).to(BF16)
        pred = u2 + gi * (u - u2) + gt * (c - u)
        x = x + float(t[i + 1] - t[i]) * pred
    return x


@pytest.mark.parametrize("cond_type", ["t2v", "i2v_head", "i2v_loop"])
def test_denoise_equals_the_explicit_loop(model, cond_type):
    refs = {"t2v": [], "i2v_head": [torch.randn(1, 16, 1, 4, 4)], "i2v_loop": [torch.randn(1, 16, 1, 4, 4)] * 2}[cond_type]
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5)).to(BF16)
    masks, masked = condition(cond_type, tuple(noise.shape), refs)
    txt, y = text_rows()
    with torch.no_grad():
        want = explicit_loop(model, noise, txt, y, masks, masked, cond_type, 12, 7.5, 3.0)
    got = denoise(model, noise, txt, y, masks=masks, masked_ref=masked, cond_type=cond_type, cfg=CFG.sampler, num_steps=12)
    assert got.dtype == BF16 and torch.equal(got, want)


def test_scales_one_give_the_conditional_pass_alone(model):
    """g_txt = g_img = 1: pred = u2 + (u - u2) + (c - u) = c. Exact in real arithmetic; the bf16 operations
    Open-Sora uses round each difference and sum, so the trajectory is compared to a conditional-only Euler
    loop within bf16 tolerance: 3 bf16 steps (2**-8 relative each) per step, 12 steps -> 5e-2 of |x|."""
    refs = [torch.randn(1, 16, 1, 4, 4)]
    got = run(model, "i2v_head", refs, guidance=1.0, guidance_img=1.0)
    noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(5)).to(BF16)
    masks, masked = condition("i2v_head", tuple(noise.shape), refs)
    txt, y = text_rows()
    t = schedule(CFG.sampler, 12, 4, 3)
    cos, sin = video_rope(CFG.mmdit, L, 3, 2, 2)
    x = pack(noise).to(BF16)
    cond = pack(torch.cat([masks, masked], 1)).to(BF16)
    with torch.no_grad():
        for i in range(12):
            c = model(x, txt[:1], torch.full((1,), t[i], dtype=BF16), y[:1], cond, cos, sin).to(BF16)
            x = x + (t[i + 1] - t[i]) * c
    want = unpack(x, 3, 2, 2).float()
    err = (got.float() - want).abs().max() / want.abs().max()
    assert err < 5e-2, err
    # and the combination itself, in float64, is exactly c
    c, u, u2 = (torch.randn(5, dtype=torch.float64) for _ in range(3))
    assert torch.allclose(u2 + 1.0 * (u - u2) + 1.0 * (c - u), c, rtol=0, atol=1e-15)


def test_t2v_third_pass_is_redundant(model):
    """For t2v the 2nd and 3rd rows have identical inputs (negative prompt, zero cond): their outputs are
    bitwise equal, so u2 == u and skipping the third pass changes nothing, bit for bit."""
    txt, y = text_rows()
    cos, sin = video_rope(CFG.mmdit, L, 3, 2, 2)
    x = pack(torch.randn(1, 16, 3, 4, 4)).to(BF16)
    cond = torch.zeros(3, 12, 68)
    with torch.no_grad():
        out = model(torch.cat([x] * 3), txt, torch.full((3,), 0.7, dtype=BF16), y, cond, cos, sin)
    assert torch.equal(out[1], out[2])
    assert torch.equal(run(model, "t2v"), run(model, "t2v", skip_redundant_pass=True))


def test_skipping_uncond_when_text_scale_is_one_is_not_bit_exact():
    """The doc's second optimisation (g_txt = 1 -> pred = c, skip the unconditional pass) holds in real
    arithmetic, but bf16 rounds c - u and then the sum: osx's sampler does not take it. The error stays
    within those two roundings, 2**-8 of |c - u| and of |c| (half a bf16 step each, relative)."""
    g = torch.Generator().manual_seed(0)
    c, u = (torch.randn(10000, generator=g).to(BF16) for _ in range(2))
    combined = u + 1.0 * (c - u)
    assert not torch.equal(combined, c)
    bound = 2.0**-8 * ((c.float() - u.float()).abs() + c.float().abs())
    assert ((combined.float() - c.float()).abs() <= bound).all()


def test_reference_conditioning_moves_the_result(model):
    a = run(model, "i2v_head", [torch.randn(1, 16, 1, 4, 4)])
    b = run(model, "i2v_head", [torch.randn(1, 16, 1, 4, 4)])
    assert (a.float() - b.float()).abs().mean() > 1e-2
