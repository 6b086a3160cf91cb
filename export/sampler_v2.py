"""Reference sampler of Open-Sora v2.0 (`opensora/utils/sampling.py`: get_schedule, I2VDenoiser), in torch.

The runtime's NumPy sampler (runtime/sampler_v2.py) is checked against this; the schedule, the guidance
scales and the conditioning are torch-free and live there, one implementation both use. Formulas:
shared/design/opensora-v2.0.md, section 5.

* Schedule: t_i = linspace(1, 0, steps+1) in float32, shifted to alpha*t / (1 + (alpha-1)*t) with
  alpha = (1 + 2/3840 * (tokens_per_frame - 256)) * sqrt(T_lat) (no exp, no clamp), as Open-Sora's float32
  tensor arithmetic with Python-float alpha.
* Every step runs the MMDiT on three rows: (prompt, reference), (negative, reference), (negative, none),
  giving c, u, u2, and combines pred = u2 + g_img*(u - u2) + g_txt*(c - u); then x += (t_next - t)*pred.
* bf16 where Open-Sora is bf16: the latent x, the model output, the timestep fed to the model, the
  conditioning, the image-scale ramp and every operation of the combination and the update. With
  `cfg.reference_dtype == "fp32"` all of these are float32 instead (no bf16 anywhere in the loop).
* Oscillation: from step `osci_start` on, odd steps use scale 1 (text and image alike).
* i2v image-scale ramps (when g_img > 1 after oscillation): g_img falls linearly from g_img to 1 over the
  steps, and grows over the latent frames from 1 (frame 0) to that value (last frame).
"""

from __future__ import annotations

import numpy as np
import torch

from osx.export.mmdit import pack, unpack, video_rope
from osx.models_v2 import SamplerV2Config
from osx.runtime import sampler_v2 as shared
from osx.runtime.sampler_v2 import guidance_scales, image_scale, oscillation, schedule, shift_alpha  # noqa: F401

BF16 = torch.bfloat16
DTYPES = {"bf16": BF16, "fp32": torch.float32}


def condition(cond_type: str, shape: tuple[int, ...], refs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, 1, T, h, w] and masked_ref [B, C, T, h, w] (float32 tensors): the runtime's `condition`."""
    masks, masked = shared.condition(cond_type, shape, [r.detach().float().cpu().numpy() for r in refs])
    return torch.from_numpy(masks), torch.from_numpy(masked)


@torch.no_grad()
def denoise(
    model,
    noise: torch.Tensor,
    txt: torch.Tensor,
    y_vec: torch.Tensor,
    *,
    masks: torch.Tensor,
    masked_ref: torch.Tensor,
    cond_type: str,
    cfg: SamplerV2Config,
    num_steps: int | None = None,
    guidance: float | None = None,
    guidance_img: float | None = None,
    skip_redundant_pass: bool = False,
    return_intermediates: bool = False,
    progress: bool = False,
):
    """Denoise `noise` [B, C, T, h, w] into a latent of the same shape (in `cfg.reference_dtype`: bf16 or float32).

    `txt` [3B, L, context] and `y_vec` [3B, vec] are the text rows in Open-Sora's order: B prompts, then
    B negative prompts twice. `masks`/`masked_ref` from `condition`. `skip_redundant_pass`: for t2v the
    second and third rows are the same input (negative prompt, zero conditioning), so u2 == u and the
    third pass is skipped (exact; see tests/test_sampler_v2.py). `progress`: a tqdm bar over the steps.
    Returns x (and the x after every step).
    """
    mmdit = model.cfg
    B, C, T, h, w = noise.shape
    steps = cfg.num_steps if num_steps is None else num_steps
    g_txt0 = cfg.guidance if guidance is None else guidance
    g_img0 = cfg.guidance_img if guidance_img is None else guidance_img
    timesteps = schedule(cfg, steps, h * w // mmdit.patch_size**2, T)
    p = mmdit.patch_size
    device, dtype = noise.device, DTYPES[cfg.reference_dtype]
    cos, sin = (t.to(device) for t in video_rope(mmdit, txt.shape[1], T, h // p, w // p))
    x = pack(noise, p).to(dtype)
    cond = pack(torch.cat([masks, masked_ref], dim=1), p).to(device, dtype)
    rows = 2 if skip_redundant_pass and cond_type == "t2v" else 3
    cond = torch.cat([cond, cond, torch.zeros_like(cond)][:rows])
    txt, y_vec = txt[: rows * B], y_vec[: rows * B]
    latents = []
    steps_iter = enumerate(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, total=steps, desc="denoising", unit="step")
    for i, (t_cur, t_next) in steps_iter:
        t_vec = torch.full((rows * B,), t_cur, dtype=dtype, device=device)
        v = model(torch.cat([x] * rows), txt, t_vec, y_vec, cond, cos, sin).to(dtype)
        c, u = v[:B], v[B : 2 * B]
        u2 = v[2 * B :] if rows == 3 else u
        g_txt, g_img = guidance_scales(cfg, i, steps, T, cond_type, g_txt0, g_img0)
        if isinstance(g_img, np.ndarray):  # the ramp over latent frames, broadcast and packed like the latent
            g_img = pack(torch.from_numpy(g_img)[None, None, :, None, None].expand(B, C, T, h, w), p).to(device, dtype)
        pred = u2 + g_img * (u - u2) + g_txt * (c - u)
        x = x + (t_next - t_cur) * pred
        if return_intermediates:
            latents.append(x)
    out = unpack(x, T, h // p, w // p, p)
    return (out, [unpack(z, T, h // p, w // p, p) for z in latents]) if return_intermediates else out
