"""Reference rectified-flow sampler: timestep schedule against independent computations, the update rule."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from osx.errors import InputError
from osx.models import OPENSORA_V1_2_TINY, SchedulerConfig
from osx.export.init import seeded_init_
from osx.export.sampler import sample, timesteps
from osx.export.stdit3 import STDiT3

SCHED = SchedulerConfig()  # 30 steps, 1000 timesteps, transform on


def bf16(v):
    return np.float32(np.float32(v).astype(ml_dtypes.bfloat16))


def expected_timesteps(steps, height, width, frames, bf16_sizes=True):
    """Shared notes 1.5, written out independently. With bf16_sizes every operation on H, W, F and the
    ratio rounds to bfloat16 as in the reference pipeline (sizes built in the model dtype)."""
    t = np.array([(1 - i / steps) * 1000 for i in range(steps)], np.float32).astype(np.float64)
    u = t / 1000
    if bf16_sizes:
        lat = 1.0 if frames == 1 else bf16(bf16(frames // 17) * 5)
        space = bf16(math.sqrt(bf16(bf16(bf16(height) * bf16(width)) / 262144)))
        r = float(bf16(bf16(space * bf16(math.sqrt(lat))) * 1.0))
    else:
        lat = 1.0 if frames == 1 else frames // 17 * 5
        r = math.sqrt(height * width / 262144) * math.sqrt(lat)
    return r * u / (1 + (r - 1) * u) * 1000, r


@pytest.mark.parametrize("height,width,frames,ratio", [(240, 426, 51, 2.4219), (480, 854, 102, 6.8438), (720, 1280, 102, 10.25), (720, 1280, 1, 1.875)])
def test_timesteps_match_the_formula(height, width, frames, ratio):
    got = timesteps(SCHED, 30, height, width, frames)
    expected, r = expected_timesteps(30, height, width, frames)
    assert got.dtype == torch.float32 and got.shape == (30,)
    assert r == pytest.approx(ratio, abs=1e-4)  # the bf16 ratio (fp32 would give e.g. 6.849 at 480p)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=2e-3)  # float32 vs float64


def test_notes_example_values():
    """Notes 1.5: 480p/102 gives 1000, 995.0, 989.7, ..., 432.2, 328.5, 191.1, and 720p/102 ends 423.2, 261.5.
    Those figures follow the float32 ratio (r = 6.849 / 10.27); the reference's bfloat16 sizes give
    r = 6.84375 / 10.25, which moves the late timesteps by about 0.2 (the drift the notes mention)."""
    fp32_480, _ = expected_timesteps(30, 480, 854, 102, bf16_sizes=False)
    fp32_720, _ = expected_timesteps(30, 720, 1280, 102, bf16_sizes=False)
    np.testing.assert_allclose(fp32_480[[0, 1, 2, -3, -2, -1]], [1000, 995.0, 989.7, 432.2, 328.5, 191.1], atol=0.06)
    np.testing.assert_allclose(fp32_720[[-2, -1]], [423.2, 261.5], atol=0.06)
    got_480 = timesteps(SCHED, 30, 480, 854, 102).numpy()
    got_720 = timesteps(SCHED, 30, 720, 1280, 102).numpy()
    np.testing.assert_allclose(got_480[:3], [1000, 995.0, 989.7], atol=0.1)
    np.testing.assert_allclose(got_480[-3:], [432.2, 328.5, 191.1], atol=0.3)
    np.testing.assert_allclose(got_720[-2:], [423.2, 261.5], atol=0.6)


def test_without_transform_and_bad_frames():
    plain = timesteps(SchedulerConfig(use_timestep_transform=False), 10, 480, 854, 102)
    np.testing.assert_allclose(plain.numpy(), np.arange(1000, 0, -100), rtol=0, atol=1e-4)
    with pytest.raises(InputError, match="num_frames=8"):
        timesteps(SCHED, 30, 240, 426, 8)


class ConstantVelocity(torch.nn.Module):
    """Velocity a for conditional rows (y = 1) and b for unconditional rows (y = 0); records its calls."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b, self.calls = a, b, []

    def forward(self, x, timestep, y, mask, fps, height, width, x_mask=None):
        self.calls.append(dict(x=x, timestep=timestep, mask=mask, fps=fps, height=height, width=width))
        cond = y.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        v = cond * self.a + (1 - cond) * self.b
        return torch.cat([v.expand_as(x), torch.full_like(x, 1e6)], dim=1)  # sigma channels must be dropped


def test_guidance_and_integration_to_zero():
    B, Lt, Cy = 2, 6, 3
    noise = torch.randn(B, 4, 2, 3, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    model = ConstantVelocity(a=0.5, b=-0.25)
    g, steps = 7.0, 12
    z, steps_out = sample(
        model, noise, torch.ones(B, Lt, Cy), mask, torch.zeros(B, Lt, Cy), height=240, width=426, num_frames=51,
        fps=24, steps=steps, guidance_scale=g, sched=SCHED, return_intermediates=True,
    )
    ts = timesteps(SCHED, steps, 240, 426, 51)
    v = -0.25 + g * (0.5 - -0.25)
    torch.testing.assert_close(z, noise + v * float(ts[0]) / 1000, rtol=1e-5, atol=1e-5)  # sum(dt) = t'_0/1000
    assert len(steps_out) == steps and torch.equal(steps_out[-1], z)
    torch.testing.assert_close(steps_out[0], noise + v * float(ts[0] - ts[1]) / 1000)
    first = model.calls[0]
    assert first["x"].shape[0] == 2 * B and torch.equal(first["x"][:B], first["x"][B:])
    assert torch.equal(first["timestep"], ts[0].expand(2 * B))
    assert torch.equal(first["mask"], torch.cat([mask, mask]))  # the uncond half uses the cond mask
    assert first["fps"].tolist() == [24.0] * 4 and first["width"].tolist() == [426.0] * 4


def test_guidance_scale_matters_with_a_real_model():
    cfg = OPENSORA_V1_2_TINY.denoiser
    model = seeded_init_(STDiT3(cfg), seed=0).eval()
    noise = torch.randn(1, 4, 2, 4, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randn(1, cfg.model_max_length, cfg.caption_channels, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(cfg.model_max_length) < 10).long()[None]
    kw = dict(height=32, width=40, num_frames=17, fps=24, steps=3, sched=SCHED)
    z1 = sample(model, noise, y, mask, model.null_text(1), guidance_scale=1.0, **kw)
    z7 = sample(model, noise, y, mask, model.null_text(1), guidance_scale=7.0, **kw)
    assert z1.shape == noise.shape and torch.isfinite(z7).all()
    assert (z1 - z7).abs().max() > 1e-3
    assert (z1 - noise).abs().max() > 1e-2  # the model moved the latent
