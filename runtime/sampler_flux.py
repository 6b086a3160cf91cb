"""t2i2v's image step in NumPy (Open-Sora's `DistilledDenoiser` over Flux.1-dev), torch-free.

Open-Sora v2.0's recommended flow makes the first frame with Flux.1-dev, then animates it as i2v_head
(`scripts/diffusion/inference.py` with `use_t2i2v`; shared/design/opensora-v2.0.md, 1.1). The image step:

* Size: the video's aspect ratio in Open-Sora's training buckets at the image resolution (768px), see
  `osx.models_v2.t2i_image_size`; one latent frame, noise [B, 16, 1, 2*ceil(H/16), 2*ceil(W/16)].
* Text: the raw prompt (no FPS or motion-score suffix), T5 + CLIP pooled, one row per prompt (no negative).
* Schedule: the v2.0 rule (runtime/sampler_v2.py `schedule`) with the image's token count and one frame:
  alpha = 1 + (2/3840)(tokens - 256), 2.0667 at 768x768.
* Loop: one pass per step, the distilled guidance scale (4.0) fed as the model's `guidance` input, Euler:
  x += (t_next - t)*v. bf16 where Open-Sora is bf16: x, the output, the timestep and guidance fed, the update;
  float32 throughout at reference dtype "fp32" (the bundle's, osx.models_v2.SamplerV2Config.reference_dtype).
* Decode: the Flux AE decoder (its graph holds z/0.3611 + 0.1159), then the PNG Open-Sora saves (`to_png_pixels`),
  then that PNG read back for i2v_head: resize to fill the video size, centre crop (`fit_to_video`).
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np

from osx.errors import InputError
from osx.models_v2 import T2IConfig
from osx.runtime.conditioning import preprocess
from osx.runtime.sampler_v2 import pack, schedule, unpack
from osx.runtime.scheduler import to_reference

F32 = np.float32
# flux(img [B, N, 64], txt [B, L, D], timesteps [B], y_vec [B, V], guidance [B]) -> velocity [B, N, 64]
FluxDenoiser = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def image_latent_shape(t2i: T2IConfig, height: int, width: int, batch: int = 1) -> tuple[int, ...]:
    """The noise of a height x width image: [B, C, 1, 2*ceil(H/16), 2*ceil(W/16)] (Open-Sora's get_noise)."""
    p = t2i.mmdit.patch_size
    return (batch, t2i.mmdit.latent_channels, 1, p * -(-height // (8 * p)), p * -(-width // (8 * p)))


def t2i_schedule(t2i: T2IConfig, num_steps: int, h: int, w: int) -> list[float]:
    """The steps+1 timesteps of an image whose latent is h x w (one frame)."""
    return schedule(t2i, num_steps, h * w // t2i.mmdit.patch_size**2, 1)


def denoise_distilled(
    model: FluxDenoiser,
    noise: np.ndarray,
    txt: np.ndarray,
    y_vec: np.ndarray,
    t2i: T2IConfig,
    *,
    num_steps: int | None = None,
    guidance: float | None = None,
    on_step: Callable[[int, np.ndarray], None] | None = None,
    reference_dtype: str = "bf16",
) -> np.ndarray:
    """Denoise `noise` [B, C, 1, h, w] into the image latent (float32 holding bf16 values, or float32 ones at
    `reference_dtype` "fp32").

    `txt` [B, L, D] and `y_vec` [B, V]: the raw prompts' T5 states and CLIP pooled vectors. `model` runs
    once per step on the B rows. `on_step(i, x)` gets the latent after step i (a view the caller may copy)."""
    B, C, T, h, w = noise.shape
    if T != 1:
        raise InputError(f"the image step denoises one latent frame, got {T}")
    if txt.shape[0] != B or y_vec.shape[0] != B:
        raise InputError(f"text rows {txt.shape[0]}/{y_vec.shape[0]} for a batch of {B}", hint="one row per prompt")
    p = t2i.mmdit.patch_size
    steps = t2i.num_steps if num_steps is None else num_steps
    timesteps = t2i_schedule(t2i, steps, h, w)

    rounded = functools.partial(to_reference, reference_dtype=reference_dtype)  # what a tensor of that dtype holds
    g_vec = rounded(np.full(B, t2i.guidance if guidance is None else guidance, dtype=F32))
    x = rounded(pack(np.asarray(noise, dtype=F32), p))
    for i, (t_cur, t_next) in enumerate(zip(timesteps[:-1], timesteps[1:])):
        t_vec = rounded(np.full(B, t_cur, dtype=F32))
        v = rounded(model(x, txt, t_vec, y_vec, g_vec))
        x = rounded(x + rounded(F32(t_next - t_cur) * v))
        if on_step is not None:
            on_step(i, unpack(x, 1, h // p, w // p, p))
    return unpack(x, 1, h // p, w // p, p)


def to_png_pixels(image: np.ndarray, reference_dtype: str = "bf16") -> np.ndarray:
    """The decoder's [3, H, W] output (about [-1, 1]) -> the uint8 [H, W, 3] PNG Open-Sora writes.

    torchvision's save_image on the decoder output: clamp to [-1, 1], +1, /2, *255, +0.5, clamp to [0, 255],
    truncate; each operation on tensors of the reference dtype (bf16: each rounded to bf16 here)."""
    bf = functools.partial(to_reference, reference_dtype=reference_dtype)
    x = bf(np.clip(bf(image), -1, 1))
    x = bf(bf(bf(bf(x + F32(1)) / F32(2)) * F32(255)) + F32(0.5))
    return np.ascontiguousarray(np.clip(x, 0, 255).astype(np.uint8).transpose(1, 2, 0))


def fit_to_video(png: np.ndarray, height: int, width: int) -> np.ndarray:
    """The saved image as i2v_head reads it: resize to fill height x width (PIL bicubic), centre crop,
    scale to [-1, 1] (Open-Sora's `resize_crop_to_fill` + ToTensor + Normalize) -> [3, 1, height, width]."""
    return preprocess(png, height, width)
