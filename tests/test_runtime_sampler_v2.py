"""The NumPy v2.0 sampler (runtime/sampler_v2.py) against the torch reference (export/sampler_v2.py): whole
runs over the tiny MMDiT, the same torch module behind both (float32 and bf16 weights), every conditioning
mode. Tolerance: the issue allows 1e-4 relative per step; both sides do the same bf16 roundings of the same
float32 operations, so the test asks for equality (0 difference) at every step. Also: the exact shortcut
(u2 = u when nothing is conditioned) and the opt-in approximate one (pred = c at unit scales)."""

import dataclasses

import numpy as np
import pytest
import torch

from osx.export.init import seeded_init_
from osx.export.mmdit import MMDiT, video_rope
from osx.export import sampler_v2 as reference
from osx.models_v2 import OPENSORA_V2_0_TINY, SamplerV2Config
from osx.numeric import round_bf16
from osx.runtime import sampler_v2
from osx.runtime.scheduler import initial_noise

CFG = OPENSORA_V2_0_TINY
L = 8  # text tokens
BF16 = torch.bfloat16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[torch.float32, BF16], ids=["fp32", "bf16"])
def mmdit(request):
    return seeded_init_(MMDiT(CFG.mmdit), seed=1).to(request.param).eval()


class Counted:
    """The torch MMDiT as the runtime's NumPy denoiser callback; counts the rows it is asked for."""

    def __init__(self, mmdit, T, h, w, text_tokens=L):
        self.mmdit, self.rows = mmdit, []
        self.cos, self.sin = video_rope(CFG.mmdit, text_tokens, T, h // 2, w // 2)

    def __call__(self, img, txt, t, y, cond):
        self.rows.append(img.shape[0])
        with torch.no_grad():
            args = (torch.from_numpy(np.ascontiguousarray(a)) for a in (img, txt, t, y, cond))
            return self.mmdit(*args, self.cos, self.sin).float().numpy()


def text_rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt, neg = (torch.randn(1, L, CFG.mmdit.context_in_dim, generator=g) for _ in range(2))
    yp, yn = (torch.randn(1, CFG.mmdit.vec_in_dim, generator=g) for _ in range(2))
    return torch.cat([prompt, neg]), torch.cat([yp, yn])


REFS = {  # cond_type: (latent frames, number of reference latent frames per reference)
    "t2v": (3, []), "i2v_head": (3, [1]), "i2v_tail": (3, [1]), "i2v_loop": (3, [1, 1]),
    "v2v_head": (10, [9]), "v2v_tail": (10, [9]), "v2v_tail_easy": (17, [17]),
}


def both(mmdit, cond_type, steps=12, seed=5, sampler=CFG.sampler, **kw):
    """(reference latents after every step, NumPy latents after every step, the NumPy callback)."""
    T, ref_frames = REFS[cond_type]
    g = torch.Generator().manual_seed(11)
    refs = [torch.randn(1, 16, n, 4, 4, generator=g) for n in ref_frames]
    shape = (1, 16, T, 4, 4)
    noise = initial_noise(seed, shape)  # the one generator of osx, both sides
    txt, y = text_rows()
    masks, masked = reference.condition(cond_type, shape, refs)
    _, want = reference.denoise(mmdit, torch.from_numpy(noise), torch.cat([txt, txt[1:]]), torch.cat([y, y[1:]]),
                                masks=masks, masked_ref=masked, cond_type=cond_type, cfg=sampler, num_steps=steps,
                                return_intermediates=True)
    np_masks, np_masked = sampler_v2.condition(cond_type, shape, [r.numpy() for r in refs])
    assert np.array_equal(np_masks, masks.numpy()) and np.array_equal(np_masked, masked.numpy())
    model, got = Counted(mmdit, T, 4, 4), []
    last = sampler_v2.denoise(model, noise, txt.numpy(), y.numpy(), masks=np_masks, masked_ref=np_masked,
                              cond_type=cond_type, cfg=sampler, num_steps=steps,
                              on_step=lambda i, x: got.append(sampler_v2.unpack(x, T, 2, 2)), **kw)
    assert np.array_equal(last, got[-1]) and len(got) == steps
    return [w.float().numpy() for w in want], got, model


@pytest.mark.parametrize("cond_type", list(REFS))
def test_whole_run_equals_the_torch_reference(mmdit, cond_type):
    want, got, model = both(mmdit, cond_type)
    for i, (w, x) in enumerate(zip(want, got)):
        assert np.all(np.isfinite(x)) and np.array_equal(round_bf16(x), x), i  # bf16 values
        rel = np.abs(x - w).max() / np.abs(w).max()
        assert rel == 0, f"step {i}: {rel:.2e} relative"
    # nothing conditioned for t2v: the third pass is skipped (exact, as the equality above shows)
    assert model.rows == [2 if cond_type == "t2v" else 3] * 12


@pytest.mark.parametrize("cond_type", ["t2v", "i2v_loop", "v2v_tail"])
def test_whole_run_at_reference_dtype_fp32_equals_the_torch_reference(cond_type):
    """SamplerV2Config.reference_dtype "fp32": the torch loop runs in float32 (the MMDiT built to round no
    timestep), the NumPy loop rounds nothing; still equal at every step (float32 operations in the same order),
    the latents are no longer bf16 values, and the run is not the bf16 one. Both sides call the MMDiT on the
    same three rows: in float32 its output depends on the batch in the last bits (2e-7 relative), which bf16
    rounding hides."""
    fp32 = dataclasses.replace(CFG.sampler, reference_dtype="fp32")
    mmdit = seeded_init_(MMDiT(CFG.mmdit, "fp32"), seed=1).eval()
    want, got, _ = both(mmdit, cond_type, steps=12, sampler=fp32, skip_redundant_pass=False)
    assert all(np.array_equal(w, x) for w, x in zip(want, got))
    assert not np.array_equal(round_bf16(got[-1]), got[-1])
    _, bf16_run, _ = both(seeded_init_(MMDiT(CFG.mmdit), seed=1).eval(), cond_type, steps=12)
    assert np.abs(bf16_run[-1] - got[-1]).max() > 1e-3 * np.abs(got[-1]).max()


def test_exact_shortcut_changes_nothing(mmdit):
    """t2v: three passes (as the reference) and two give the same latents at every step, bit for bit, because
    the denoiser's outputs for two identical rows are identical (u2 = u); -0 and +0 compare equal."""
    _, two, m2 = both(mmdit, "t2v")
    _, three, m3 = both(mmdit, "t2v", skip_redundant_pass=False)
    assert m2.rows == [2] * 12 and m3.rows == [3] * 12
    assert all(np.array_equal(a, b) for a, b in zip(two, three))


def test_the_oscillating_reference_schedule_is_exercised(mmdit):
    """i2v at 50 steps: the ramp, oscillation past step 10 and the shift all play; still equal throughout."""
    want, got, _ = both(mmdit, "i2v_head", steps=50)
    assert all(np.array_equal(w, x) for w, x in zip(want, got))


@pytest.mark.parametrize("cond_type", ["t2v", "i2v_head"])
def test_approximate_shortcut_is_close_but_not_exact(mmdit, cond_type):
    """Opt-in: on unit-scale steps (20 of 50: odd steps from 10 on) only the conditional pass runs. In real
    arithmetic pred = c there; in bf16 u + (c - u) rounds twice, so the runs part by a few bf16 steps of
    the latent. Bound: 2e-2 of max|x| over 50 steps (measured 0.6e-2 to 1.0e-2, fp32 and bf16 weights)."""
    want, exact, m_exact = both(mmdit, cond_type, steps=50)
    _, fast, m_fast = both(mmdit, cond_type, steps=50, skip_unit_scale_passes=True)
    full = 2 if cond_type == "t2v" else 3
    assert m_fast.rows == [1 if i >= 10 and i % 2 else full for i in range(50)]
    assert sum(m_fast.rows) == sum(m_exact.rows) - 20 * (full - 1)
    rel = np.abs(fast[-1] - exact[-1]).max() / np.abs(exact[-1]).max()
    assert not np.array_equal(fast[-1], exact[-1]) and rel < 2e-2, rel


def test_scales_one_run_one_pass_only_when_asked(mmdit):
    """With guidance 1 (text and image) every step is a unit-scale step; default: all passes still run."""
    sampler = SamplerV2Config(num_steps=4, guidance=1.0, guidance_img=1.0)
    _, _, m = both(mmdit, "i2v_tail", steps=4, sampler=sampler)
    assert m.rows == [3] * 4
    _, _, m = both(mmdit, "i2v_tail", steps=4, sampler=sampler, skip_unit_scale_passes=True)
    assert m.rows == [1] * 4


def test_schedule_is_one_implementation():
    """The reference imports the runtime's schedule (no copy); the doc's formula is checked against it in
    tests/test_sampler_v2.py at the documented settings."""
    assert reference.schedule is sampler_v2.schedule and reference.shift_alpha is sampler_v2.shift_alpha
    assert reference.image_scale is sampler_v2.image_scale


def test_linspace_rule_is_torchs_scalar_rule():
    """linspace_f32 = torch.linspace's scalar rule written out in float32 (first half from the start, second
    from the end); torch's own CPU result may differ by one float32 step where its SIMD path runs."""
    for start, end, n in [(1.0, 0.0, 51), (3.0, 1.0, 13), (1.0, 2.44, 33), (7.5, 1.0, 2), (2.0, 1.0, 1)]:
        got = sampler_v2.linspace_f32(start, end, n)
        f = np.float32
        step = (f(end) - f(start)) / f(max(n - 1, 1))
        want = [f(start) + f(i) * step if i < n // 2 else f(end) - f(n - 1 - i) * step for i in range(n)]
        assert np.array_equal(got, np.array(want if n > 1 else [f(start)], dtype=f))
        assert np.abs(got - torch.linspace(start, end, n).numpy()).max() <= 2 * np.spacing(f(max(abs(start), abs(end))))


def test_text_rows_are_prompt_then_negative(mmdit):
    from osx.errors import InputError

    noise = initial_noise(0, (1, 16, 3, 4, 4))
    txt, y = text_rows()
    masks, masked = sampler_v2.condition("t2v", noise.shape, [])
    with pytest.raises(InputError, match="2B rows"):
        sampler_v2.denoise(Counted(mmdit, 3, 4, 4), noise, np.concatenate([txt, txt[1:]]), y.numpy(), masks=masks,
                           masked_ref=masked, cond_type="t2v", cfg=CFG.sampler, num_steps=2)


@pytest.mark.parametrize("cond_type", ["t2v", "i2v_head"])
def test_the_reference_pipeline_from_a_seed(cond_type):
    """export/pipeline_v2.py's run from a seed (its T5/CLIP states, conditioning, bf16 MMDiT) is reproduced
    step for step by the NumPy sampler given the same seed: both draw osx's one noise,
    `initial_noise(seed, shape)` (NumPy PCG64) rounded to bf16. Tolerance 0, as above."""
    from osx.export.pipeline_v2 import build_reference_v2, reference_generate_v2

    ref = build_reference_v2(CFG)
    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    r = reference_generate_v2(ref, "a red fox in the snow", cond_type=cond_type, seed=7, num_steps=12,
                              references=[image] if cond_type != "t2v" else None)
    noise = initial_noise(7, r.noise.shape)
    assert np.array_equal(round_bf16(noise), r.noise)
    _, _, T, h, w = noise.shape
    got = []
    sampler_v2.denoise(Counted(ref.mmdit, T, h, w, r.txt.shape[1]), noise, r.txt[:2], r.y_vec[:2], masks=r.masks,
                       masked_ref=r.masked_ref, cond_type=cond_type, cfg=CFG.sampler, num_steps=12,
                       on_step=lambda i, x: got.append(sampler_v2.unpack(x, T, h // 2, w // 2)))
    assert len(got) == len(r.latents) == 12
    assert all(np.array_equal(x, w) for x, w in zip(got, r.latents))
