"""NumPy RFLOW vs independent computations: torch bf16 arithmetic as Open-Sora runs it, Python floats,
and the example values in shared/design/open-sora-models.md section 1.5."""

import math

import numpy as np
import pytest

from osx.runtime import scheduler as rf

torch = pytest.importorskip("torch")

SETTINGS = [(240, 426, 51), (480, 854, 102), (720, 1280, 102), (720, 1280, 1), (360, 640, 204), (64, 64, 34), (128, 96, 17)]


def open_sora_timesteps(num_steps, height, width, num_frames):
    """Open-Sora v1.2's RFLOW.sample timestep list + timestep_transform, in torch with bf16 model args
    (prepare_multi_resolution_info builds height/width/num_frames in the model dtype)."""
    bf16 = torch.bfloat16
    kw = {k: torch.tensor([v], dtype=bf16) for k, v in dict(height=height, width=width, num_frames=num_frames).items()}
    out = []
    for i in range(num_steps):
        t = torch.tensor([(1.0 - i / num_steps) * 1000]) / 1000
        ratio_space = (kw["height"] * kw["width"] / (512 * 512)).sqrt()
        frames = torch.ones_like(kw["num_frames"]) if kw["num_frames"][0] == 1 else kw["num_frames"] // 17 * 5
        ratio = ratio_space * (frames / 1).sqrt() * 1.0
        out.append((ratio * t / (1 + (ratio - 1) * t) * 1000).item())
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("height,width,frames", SETTINGS)
@pytest.mark.parametrize("steps", [30, 10])
def test_timesteps_equal_open_sora_torch_bf16(steps, height, width, frames):
    np.testing.assert_array_equal(rf.timesteps(steps, height, width, frames), open_sora_timesteps(steps, height, width, frames))


@pytest.mark.parametrize("height,width,frames", SETTINGS)
def test_timesteps_match_the_float_formula_up_to_bf16_ratio(height, width, frames):
    # The transform in plain Python floats: only the bf16 rounding of r separates the two (<= 0.2% in r).
    r = math.sqrt(height * width / 512**2) * math.sqrt(1 if frames == 1 else frames // 17 * 5)
    for i, t in enumerate(rf.timesteps(30, height, width, frames)):
        u = 1 - i / 30
        assert t == pytest.approx(1000 * r * u / (1 + (r - 1) * u), rel=2e-3, abs=0.5)


def test_notes_example_values():
    # Notes 1.5: r = 2.42 (240p, 51), 6.85 (480p, 102), 10.27 (720p, 102), 1.875 (720p image) -- those
    # are the float values; Open-Sora's bf16 r is within one bf16 step (1/128 relative) of them.
    for (h, w, f), r in {(240, 426, 51): 2.42, (480, 854, 102): 6.85, (720, 1280, 102): 10.27, (720, 1280, 1): 1.875}.items():
        assert rf.shift_ratio(h, w, f) == pytest.approx(r, rel=1 / 128)
    assert rf.shift_ratio(720, 1280, 1) == 1.875  # exact in bf16
    # 480p / 102 frames: t' = 1000, 995.0, 989.7, ..., 432.2, 328.5, 191.1 (notes, float r = 6.849);
    # with Open-Sora's bf16 r = 6.84375 the tail moves by at most 0.3.
    t = rf.timesteps(30, 480, 854, 102)
    np.testing.assert_allclose(t[:3], [1000, 995.0, 989.7], atol=0.05)
    np.testing.assert_allclose(t[-3:], [432.2, 328.5, 191.1], atol=0.3)
    np.testing.assert_allclose(rf.timesteps(30, 720, 1280, 102)[-2:], [423.2, 261.5], atol=0.6)


def test_no_transform_is_the_plain_list():
    np.testing.assert_array_equal(rf.timesteps(4, 64, 64, 34, use_timestep_transform=False), [1000, 750, 500, 250])


def test_round_bf16_equals_torch_cast():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(200_000).astype(np.float32) * np.float32(10.0) ** rng.integers(-30, 30, 200_000).astype(np.float32),
        rng.integers(0, 2**32, 100_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every bit pattern class
        np.array([0.0, -0.0, np.inf, -np.inf, 3.3895314e38, -3.3895314e38, 1e-45, 1.00390625, 1.01171875], np.float32),
    ])
    x = x[~np.isnan(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    np.testing.assert_array_equal(rf.round_bf16(x), want)
    assert np.isnan(rf.round_bf16(np.float32("nan")))
    # every NaN stays NaN (quiet, signalling, either sign: the ones a 32-bit carry would turn into inf or wrap)
    nans = np.array([0x7F800001, 0xFF800001, 0x7FC00000, 0xFFC00000, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFF8000], np.uint32).view(np.float32)
    assert np.isnan(rf.round_bf16(nans)).all()
    # shape kept (0-d for a scalar), non-contiguous input, the input left alone
    grid = x[:600].reshape(20, 30)
    np.testing.assert_array_equal(rf.round_bf16(grid.T), want[:600].reshape(20, 30).T)
    assert rf.round_bf16(np.float32(1.00390625)).shape == () and rf.round_bf16(grid).shape == (20, 30)
    np.testing.assert_array_equal(grid, x[:600].reshape(20, 30))


def test_dts_from_unrounded_timesteps_and_last_step_to_zero():
    ts = rf.timesteps(30, 480, 854, 102)
    d = rf.dts(ts)
    assert d.dtype == np.float32 and d.shape == (30,)
    # torch: dt = (t_i - t_{i+1}) / 1000 on float32 tensors, and t_last / 1000
    t = torch.from_numpy(ts)
    want = torch.cat([t[:-1] - t[1:], t[-1:]]) / 1000
    np.testing.assert_array_equal(d, want.numpy())
    assert d.sum() == pytest.approx(1.0, rel=1e-6)  # integrates from t = 1000 down to 0


def test_guidance_and_step_equal_torch_float32():
    rng = np.random.default_rng(1)
    z, vc, vu = (rng.standard_normal((1, 4, 3, 5, 6), dtype=np.float32) for _ in range(3))
    dt = rf.dts(rf.timesteps(10, 64, 64, 34))[3]
    v = rf.guidance(vc, vu, 7.0)
    tz, tvc, tvu = map(torch.from_numpy, (z, vc, vu))
    want_v = tvu + 7.0 * (tvc - tvu)
    np.testing.assert_array_equal(v, want_v.numpy())
    np.testing.assert_array_equal(rf.step(z, v, dt), (tz + want_v * torch.tensor([dt])[:, None, None, None, None]).numpy())
    assert rf.step(z, v, dt).dtype == np.float32


def test_initial_noise_is_seeded_float32():
    a = rf.initial_noise(42, (1, 4, 10, 8, 8))
    assert a.dtype == np.float32 and a.shape == (1, 4, 10, 8, 8)
    np.testing.assert_array_equal(a, rf.initial_noise(42, (1, 4, 10, 8, 8)))
    assert not np.array_equal(a, rf.initial_noise(43, (1, 4, 10, 8, 8)))
    assert abs(float(a.mean())) < 0.05 and abs(float(a.std()) - 1) < 0.05
