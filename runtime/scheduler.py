"""Open-Sora v1.2 rectified-flow sampler (RFLOW) in NumPy, stateless.

Source: opensora/schedulers/rf/__init__.py and rectified_flow.py at v1.2.0 (shared notes 1.5).

Convention: x_t = (1 - u) x0 + u eps with u = t / 1000; the model predicts v = x0 - eps, so moving
from t'_i to t'_(i+1) is the Euler step  z <- z + v * dt,  dt = (t'_i - t'_(i+1)) / 1000  (> 0).

    t_i   = (1 - i / N) * 1000                         i = 0..N-1   (1000 ... 1000/N; never 0)
    u     = t_i / 1000
    r     = sqrt(H * W / 512^2) * sqrt(T'),  T' = floor(F / 17) * 5, or 1 for an image (F = 1)
    t'_i  = 1000 * r u / (1 + (r - 1) u)               (the resolution- and length-dependent shift)
    dt_i  = (t'_i - t'_(i+1)) / 1000,   dt_(N-1) = t'_(N-1) / 1000      (the last step lands on 0)
    v     = v_uncond + s (v_cond - v_uncond)           (classifier-free guidance, scale s)

Open-Sora computes r from `height`, `width` and `num_frames` tensors in the model dtype (the reference
dtype, SchedulerConfig.reference_dtype; bfloat16 by default): in bf16 every operation on them (product,
/ 512^2, sqrt, // 17, * 5, sqrt, product, r - 1) is rounded to bf16, while t stays float32
(`torch.tensor([t])`) and the mixed products promote to float32. `timesteps` replays exactly that
arithmetic with `to_reference` (float32 op, then round-to-nearest-even to bf16 — what torch does on the
CPU and the GPU; in fp32 no rounding). The model also sees t in that dtype (its first op casts the
timestep), so the pipeline feeds `to_reference(t')` to the denoiser; dt uses the unrounded t'.
"""

from __future__ import annotations

import numpy as np

from osx.numeric import round_bf16

F32 = np.float32


def initial_noise(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    """THE initial latent noise of osx (runtime and torch reference alike): N(0, 1) float32 from
    NumPy's PCG64. Open-Sora draws bf16 noise from the CUDA generator, which NumPy cannot reproduce."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def to_reference(x, reference_dtype: str = "bf16") -> np.ndarray:
    """float32 values as a tensor of the reference dtype holds them: rounded to bf16, or unchanged (fp32)."""
    x = np.asarray(x, dtype=F32)
    return round_bf16(x) if reference_dtype == "bf16" else x


def shift_ratio(height: int, width: int, num_frames: int, base_resolution: int = 512 * 512,
                reference_dtype: str = "bf16") -> np.float32:
    """r = sqrt(H*W / base) * sqrt(T'), every step in the reference dtype's arithmetic as Open-Sora does it."""
    def _bf(x):
        return to_reference(x, reference_dtype)

    h, w, f = _bf(height), _bf(width), _bf(num_frames)
    ratio_space = _bf(np.sqrt(_bf(_bf(h * w) / F32(base_resolution))))
    frames = _bf(1.0) if num_frames == 1 else _bf(_bf(np.floor(f / F32(17))) * F32(5))
    ratio_time = _bf(np.sqrt(frames))
    return F32(_bf(ratio_space * ratio_time))


def timesteps(num_steps: int, height: int, width: int, num_frames: int, *, num_timesteps: int = 1000,
              use_timestep_transform: bool = True, base_resolution: int = 512 * 512,
              reference_dtype: str = "bf16") -> np.ndarray:
    """t'_0..t'_(N-1) (float32, descending from num_timesteps) for a video of height x width x num_frames."""
    # Python float math first, then float32: Open-Sora builds torch.tensor([t]) from a Python float.
    t = np.array([(1.0 - i / num_steps) * num_timesteps for i in range(num_steps)], dtype=F32)
    if not use_timestep_transform:
        return t
    u = t / F32(num_timesteps)
    r = shift_ratio(height, width, num_frames, base_resolution, reference_dtype)
    r_minus_1 = F32(to_reference(r - F32(1), reference_dtype))  # a bf16 tensor minus a Python int stays bf16
    return (r * u / (F32(1) + r_minus_1 * u)) * F32(num_timesteps)


def dts(ts: np.ndarray, num_timesteps: int = 1000) -> np.ndarray:
    """Euler step sizes from the unrounded float32 t': differences, and t'_last itself at the end."""
    ts = np.asarray(ts, dtype=F32)
    return np.append(ts[:-1] - ts[1:], ts[-1]) / F32(num_timesteps)


def guidance(v_cond: np.ndarray, v_uncond: np.ndarray, scale: float) -> np.ndarray:
    """Classifier-free guidance: v_u + s (v_c - v_u), in float32."""
    return v_uncond + F32(scale) * (v_cond - v_uncond)


def step(z: np.ndarray, v: np.ndarray, dt: float) -> np.ndarray:
    """One Euler step toward the data: z + v dt (v = x0 - eps, dt > 0)."""
    return z + v * F32(dt)
