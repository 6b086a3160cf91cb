"""Reference of t2i2v's image step in torch: Open-Sora's `DistilledDenoiser` over Flux.1-dev, then the Flux
AE decoder, the PNG it saves and the resize-crop that i2v_head reads it with.

The runtime's NumPy step (runtime/sampler_flux.py) is checked against this. Shared with it: the schedule
and the image size (torch-free rules). Written here in torch, as Open-Sora computes them: the loop in the
reference dtype (bf16 as Open-Sora: x, the model output, timesteps, guidance and the update are bf16 tensors;
float32 at "fp32"), torchvision's save_image arithmetic on the image in that dtype, PIL's resize
(export/pipeline.py `reference_preprocess`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from osx.export.flux_ae import FluxAEDecoder
from osx.export.mmdit import MMDiT, pack, unpack, video_rope
from osx.export.pipeline import reference_preprocess
from osx.export.pipeline_v2 import CLIP_PAD, ReferenceV2
from osx.export.sampler_v2 import DTYPES
from osx.models_v2 import T2IConfig, t2i_image_size
from osx.runtime.sampler_flux import image_latent_shape, t2i_schedule
from osx.runtime.scheduler import initial_noise
from osx.runtime.tokenizer import TextTokenizer



@torch.no_grad()
def denoise_distilled(model: MMDiT, noise: torch.Tensor, txt: torch.Tensor, y_vec: torch.Tensor, t2i: T2IConfig, *,
                      num_steps: int | None = None, guidance: float | None = None,
                      return_intermediates: bool = False):
    """Denoise `noise` [B, C, 1, h, w] (a tensor of the reference dtype: bf16 or float32) with one
    guidance-distilled pass per step, in that dtype; -> x, and the x after every step with `return_intermediates`."""
    B, C, T, h, w = noise.shape
    p = model.cfg.patch_size
    steps = t2i.num_steps if num_steps is None else num_steps
    timesteps = t2i_schedule(t2i, steps, h, w)
    cos, sin = video_rope(model.cfg, txt.shape[1], T, h // p, w // p)
    dtype = noise.dtype
    x = pack(noise, p)
    g_vec = torch.full((B,), t2i.guidance if guidance is None else guidance, dtype=dtype)
    latents = []
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((B,), t_cur, dtype=dtype)
        pred = model(x, txt, t_vec, y_vec, None, cos, sin, guidance=g_vec).to(dtype)
        x = x + (t_next - t_cur) * pred
        latents.append(unpack(x, T, h // p, w // p, p))
    out = unpack(x, T, h // p, w // p, p)
    return (out, latents) if return_intermediates else out


def png_pixels(image: torch.Tensor) -> np.ndarray:
    """torchvision's save_image(normalize=True, value_range=(-1, 1)) on a [3, H, W] image (in its dtype) -> uint8 [H, W, 3]."""
    x = image.clamp(-1, 1).sub(-1).div(2.0)
    return x.mul(255).add(0.5).clamp(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


@dataclass
class ReferenceT2IResult:
    height: int  # the image's size (training bucket)
    width: int
    t5_ids: np.ndarray  # [1, L] of the raw prompt
    clip_ids: np.ndarray
    txt: np.ndarray  # [1, L, D] T5 states (float32 copy)
    y_vec: np.ndarray  # [1, V]
    noise: np.ndarray  # [1, 16, 1, h, w] float32 (bf16 values)
    timesteps: list[float]
    latents: list[np.ndarray]  # x after every step
    latent: np.ndarray  # the final image latent
    image: np.ndarray  # [3, H, W] the decoder's output (float32 copy of bf16)
    png: np.ndarray  # uint8 [H, W, 3] as Open-Sora saves it
    reference: np.ndarray  # [3, 1, video H, video W] in [-1, 1]: the PNG as i2v_head reads it


@torch.no_grad()
def reference_t2i(model: ReferenceV2, flux: MMDiT, flux_ae: FluxAEDecoder, t2i: T2IConfig, prompt: str, *,
                  aspect_ratio: str, video_height: int, video_width: int, seed: int = 42,
                  noise: np.ndarray | None = None, num_steps: int | None = None) -> ReferenceT2IResult:
    """The image step of t2i2v for one prompt, with the T5/CLIP of the v2.0 reference `model`, in its reference
    dtype (model.cfg.sampler.reference_dtype; `flux` built with the same)."""
    height, width = t2i_image_size(t2i, aspect_ratio)
    shape = image_latent_shape(t2i, height, width)
    noise = initial_noise(seed, shape) if noise is None else noise
    t5_ids, _ = TextTokenizer(model.t5_tokenizer, model.cfg.t5.max_length).encode([prompt])  # the raw prompt
    clip_ids, _ = TextTokenizer(model.clip_tokenizer, model.cfg.clip.max_length, pad_token=CLIP_PAD).encode([prompt])
    t5_ids, clip_ids = torch.from_numpy(t5_ids), torch.from_numpy(clip_ids)
    txt, y_vec = model.t5(t5_ids, torch.ones_like(t5_ids)), model.clip(clip_ids)
    dtype = DTYPES[model.cfg.sampler.reference_dtype]
    z = torch.from_numpy(np.asarray(noise, dtype=np.float32)).to(dtype)
    x, latents = denoise_distilled(flux, z, txt, y_vec, t2i, num_steps=num_steps, return_intermediates=True)
    image = flux_ae(x[:, :, 0]).to(dtype)[0]
    png = png_pixels(image)
    f32 = lambda t: t.float().numpy()  # noqa: E731
    steps = t2i.num_steps if num_steps is None else num_steps
    return ReferenceT2IResult(
        height=height, width=width, t5_ids=t5_ids.numpy(), clip_ids=clip_ids.numpy(), txt=f32(txt), y_vec=f32(y_vec),
        noise=f32(z), timesteps=t2i_schedule(t2i, steps, shape[3], shape[4]), latents=[f32(t) for t in latents],
        latent=f32(x), image=f32(image), png=png, reference=reference_preprocess(png, video_height, video_width).numpy()[:, None],
    )


@torch.no_grad()
def reference_t2i2v(model: ReferenceV2, flux: MMDiT, flux_ae: FluxAEDecoder, t2i: T2IConfig, prompt: str, *,
                    aspect_ratio: str, resolution: str | None = None, num_frames: int | None = None,
                    seed: int = 42, num_steps: int | None = None, t2i_steps: int | None = None,
                    noise: np.ndarray | None = None, image_noise: np.ndarray | None = None, **video):
    """Open-Sora v2.0's text -> image -> video for one prompt: the image step (`reference_t2i`, seeded like the
    video), its PNG as the i2v_head reference of `reference_generate_v2` (which resize-crops it to the video's
    size). -> (ReferenceT2IResult, ReferenceV2Result). `video`: reference_generate_v2's other keywords."""
    from osx.export.pipeline_v2 import reference_generate_v2
    from osx.models_v2 import image_size

    height, width = image_size(model.cfg, resolution or model.cfg.defaults.resolution, aspect_ratio)
    image = reference_t2i(model, flux, flux_ae, t2i, prompt, aspect_ratio=aspect_ratio, video_height=height,
                          video_width=width, seed=seed, noise=image_noise, num_steps=t2i_steps)
    result = reference_generate_v2(model, prompt, cond_type="i2v_head", references=[image.png], height=height, width=width,
                                   num_frames=num_frames, num_steps=num_steps, seed=seed, noise=noise, **video)
    return image, result
