"""Reference sampler of Open-Sora v2.0 (`opensora/utils/sampling.py`: get_schedule, I2VDenoiser), in torch.

The runtime's NumPy sampler is checked against this. Formulas: shared/design/opensora-v2.0.md, section 5.

* Schedule: t_i = linspace(1, 0, steps+1) in float32, shifted to alpha*t / (1 + (alpha-1)*t) with
  alpha = (1 + 2/3840 * (tokens_per_frame - 256)) * sqrt(T_lat) (no exp, no clamp), as Open-Sora's float32
  tensor arithmetic with Python-float alpha.
* Every step runs the MMDiT on three rows: (prompt, reference), (negative, reference), (negative, none),
  giving c, u, u2, and combines pred = u2 + g_img*(u - u2) + g_txt*(c - u); then x += (t_next - t)*pred.
* bf16 where Open-Sora is bf16: the latent x, the model output, the timestep fed to the model, the
  conditioning, the image-scale ramp and every operation of the combination and the update.
* Oscillation: from step `osci_start` on, odd steps use scale 1 (text and image alike).
* i2v image-scale ramps (when g_img > 1 after oscillation): g_img falls linearly from g_img to 1 over the
  steps, and grows over the latent frames from 1 (frame 0) to that value (last frame).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from osx.errors import InputError
from osx.export.mmdit import pack, unpack, video_rope
from osx.models_v2 import COND_TYPES, SamplerV2Config

BF16 = torch.bfloat16


def shift_alpha(cfg: SamplerV2Config, tokens_per_frame: int, latent_frames: int) -> float:
    """alpha: linear in the tokens per latent frame through (256, 1) and (4096, 3), times sqrt(T_lat)."""
    if cfg.flow_shift is not None:
        return float(cfg.flow_shift)
    slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_seq - cfg.base_seq)
    return (slope * tokens_per_frame + cfg.base_shift - slope * cfg.base_seq) * math.sqrt(latent_frames)


def schedule(cfg: SamplerV2Config, num_steps: int, tokens_per_frame: int, latent_frames: int) -> list[float]:
    """The steps+1 timesteps 1 = t'_0 > ... > t'_steps = 0 (float32 values as Python floats).

    t = linspace(1, 0, steps+1) by the scalar rule of torch's kernels (start + i*step in the first half,
    end - (steps-i)*step in the second, float32): Open-Sora calls torch.linspace on the CPU, whose SIMD
    path may differ from that by one float32 step at a few entries depending on the CPU's vector width.
    Then the shift in float32, alpha and alpha - 1 rounded to float32 as torch does with Python scalars.
    """
    f32 = np.float32
    step = (f32(0) - f32(1)) / f32(num_steps)
    half = (num_steps + 1) // 2
    t = np.array([f32(1) + step * f32(i) if i < half else f32(0) - step * f32(num_steps - i) for i in range(num_steps + 1)], dtype=f32)
    if cfg.shift:
        alpha = shift_alpha(cfg, tokens_per_frame, latent_frames)
        t = (f32(alpha) * t) / (f32(1) + f32(alpha - 1) * t)
    return [float(v) for v in t]


def oscillation(scale: float, step: int, start: int) -> float:
    """Open-Sora's get_oscillation_gs: `scale` before `start` and on even steps, 1.0 on odd steps after."""
    return scale if step < start or step % 2 == 0 else 1.0


def image_scale(cfg: SamplerV2Config, g_img: float, step: int, num_steps: int, latent_frames: int, cond_type: str):
    """The image guidance scale of one step: a float, or the i2v ramp as a [T_lat] float32 tensor."""
    if not (g_img > 1.0 and cfg.scale_temporal_osci and "i2v" in cond_type):
        return g_img
    upper = torch.linspace(g_img, 1.0, num_steps + 1)[step]
    return torch.linspace(1.0, upper.item(), latent_frames)


def condition(cond_type: str, shape: tuple[int, ...], refs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """masks [B, 1, T, h, w] and masked_ref [B, C, T, h, w] of `prepare_inference_condition` (causal VAE).

    `refs`: the VAE-encoded references [B, C, T_ref, h, w]: none for t2v; the image for i2v_head/i2v_tail;
    the head and the tail image for i2v_loop; the video (at least k latent frames) for v2v. Conditioning
    needs more than one latent frame, as in Open-Sora (an image is never conditioned).
    """
    if cond_type not in COND_TYPES:
        raise InputError(f"unknown cond_type {cond_type!r}", hint=f"use one of {', '.join(COND_TYPES)}")
    B, C, T, h, w = shape
    masks = torch.zeros(B, 1, T, h, w)
    masked = torch.zeros(B, C, T, h, w)
    wanted = {"t2v": 0, "i2v_loop": 2}.get(cond_type, 1)
    if len(refs) != wanted:
        raise InputError(f"{cond_type} takes {wanted} reference(s), got {len(refs)}")
    if cond_type == "t2v" or T == 1:
        return masks, masked
    if cond_type.startswith("v2v"):
        k = (16 if cond_type.endswith("_easy") else 8) + 1  # 32 or 64 pixel frames + the causal first
        ref = refs[0]
        if k > T:
            raise InputError(f"{cond_type} conditions {k} latent frames; the video has {T}",
                             hint=f"generate at least {4 * (k - 1) + 1} frames")
        if ref.shape[2] < k:
            raise InputError(f"{cond_type} needs a reference of at least {k} latent frames ({4 * (k - 1) + 1} video frames)")
        frames = slice(0, k) if "head" in cond_type else slice(T - k, T)
        masks[:, :, frames] = 1
        masked[:, :, frames] = (ref[:, :, :k] if "head" in cond_type else ref[:, :, -k:]).float()
        return masks, masked
    if cond_type in ("i2v_head", "i2v_loop"):
        masks[:, :, 0] = 1
        masked[:, :, 0] = refs[0][:, :, 0].float()
    if cond_type in ("i2v_tail", "i2v_loop"):
        masks[:, :, -1] = 1
        masked[:, :, -1] = refs[-1][:, :, -1].float()
    return masks, masked


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
    """Denoise `noise` [B, C, T, h, w] into a latent of the same shape (bf16).

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
    device = noise.device
    cos, sin = (t.to(device) for t in video_rope(mmdit, txt.shape[1], T, h // p, w // p))
    x = pack(noise, p).to(BF16)
    cond = pack(torch.cat([masks, masked_ref], dim=1), p).to(device, BF16)
    rows = 2 if skip_redundant_pass and cond_type == "t2v" else 3
    cond = torch.cat([cond, cond, torch.zeros_like(cond)][:rows])
    txt, y_vec = txt[: rows * B], y_vec[: rows * B]
    latents = []
    steps_iter = enumerate(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, total=steps, desc="denoising", unit="step")
    for i, (t_cur, t_next) in steps_iter:
        t_vec = torch.full((rows * B,), t_cur, dtype=BF16, device=device)
        v = model(torch.cat([x] * rows), txt, t_vec, y_vec, cond, cos, sin).to(BF16)
        c, u = v[:B], v[B : 2 * B]
        u2 = v[2 * B :] if rows == 3 else u
        g_txt = oscillation(g_txt0, i, cfg.osci_start) if cfg.text_osci else g_txt0
        g_img = oscillation(g_img0, i, cfg.osci_start) if cfg.image_osci else g_img0
        g_img = image_scale(cfg, g_img, i, steps, T, cond_type)
        if torch.is_tensor(g_img):  # the ramp over latent frames, broadcast and packed like the latent
            g_img = pack(g_img[None, None, :, None, None].expand(B, C, T, h, w), p).to(device, BF16)
        pred = u2 + g_img * (u - u2) + g_txt * (c - u)
        x = x + (t_next - t_cur) * pred
        if return_intermediates:
            latents.append(x)
    out = unpack(x, T, h // p, w // p, p)
    return (out, [unpack(z, T, h // p, w // p, p) for z in latents]) if return_intermediates else out
