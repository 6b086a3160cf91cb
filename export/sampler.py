"""Reference rectified-flow sampler of Open-Sora v1.2 (`opensora/schedulers/rf`, tag v1.2.0), in torch.

The runtime's NumPy scheduler is checked against this. Text-to-video only (no frame mask), guidance by
one batched cond+uncond call per step. Formulas: shared/design/open-sora-models.md, section 1.5.
"""

from __future__ import annotations

import torch

from osx.errors import InputError
from osx.models import SchedulerConfig

VAE_CHUNK_FRAMES, VAE_CHUNK_LATENTS = 17, 5  # hard-coded in the reference's timestep transform


def timesteps(sched: SchedulerConfig, num_steps: int, height: int, width: int, num_frames: int) -> torch.Tensor:
    """The `num_steps` float32 timesteps t'_0 > ... > t'_{n-1} (in [0, num_timesteps]) for a video size.

    Base list t_i = (1 - i/n) * num_timesteps; with `use_timestep_transform`, u = t/num_timesteps goes
    to r*u / (1 + (r-1)*u), r = sqrt(H*W / base_resolution) * sqrt(T'), T' = 1 for one frame else
    floor(F/17)*5. As in the reference pipeline, H, W and F are tensors of the model dtype
    (`sched.reference_dtype`): in bfloat16, H*W, the square roots and r are rounded to bfloat16
    (r = 6.84375 at 854x480/102 frames, not 6.849); the final expression mixes r with float32 u and is
    computed in float32.
    """
    t = torch.tensor([(1.0 - i / num_steps) * sched.num_timesteps for i in range(num_steps)], dtype=torch.float32)
    if not sched.use_timestep_transform:
        return t
    if 1 < num_frames < VAE_CHUNK_FRAMES:
        raise InputError(
            f"num_frames={num_frames}: the timestep transform needs 1 frame or at least {VAE_CHUNK_FRAMES}",
            hint=f"the reference computes floor(F/{VAE_CHUNK_FRAMES})*{VAE_CHUNK_LATENTS} latent frames, which is 0 here",
        )
    dtype = torch.bfloat16 if sched.reference_dtype == "bf16" else torch.float32
    h, w, f = (torch.tensor([v], dtype=dtype) for v in (height, width, num_frames))
    frames = torch.ones_like(f) if num_frames == 1 else f // VAE_CHUNK_FRAMES * VAE_CHUNK_LATENTS
    ratio_space = (h * w / sched.base_resolution).sqrt()
    ratio_time = (frames / 1).sqrt()  # base_num_frames = 1
    ratio = ratio_space * ratio_time * 1.0  # transform scale 1.0
    u = t / sched.num_timesteps
    return (ratio * u / (1 + (ratio - 1) * u)) * sched.num_timesteps


@torch.no_grad()
def sample(
    model,
    noise: torch.Tensor,
    y_cond: torch.Tensor,
    mask: torch.Tensor,
    y_uncond: torch.Tensor,
    *,
    height: int,
    width: int,
    num_frames: int,
    fps: float,
    steps: int,
    guidance_scale: float,
    sched: SchedulerConfig,
    return_intermediates: bool = False,
    cond_latent: torch.Tensor | None = None,
    cond_mask: torch.Tensor | None = None,
):
    """Denoise `noise` [B, C, T, H, W] (injected, so runs are reproducible) into a latent.

    `model` is an STDiT3. y_cond/y_uncond [B, L, caption_channels] (y_uncond = model.null_text(B)),
    mask [B, L] is the conditional prompt's token mask and is used for the unconditional rows too, as the
    reference repeats it. height/width in pixels, num_frames in pixel frames (used by the timestep
    transform), fps as the model's conditioning (the reference passes 120 for single images).
    Each step: v = v_u + g*(v_c - v_u) on the first C output channels, z += v*dt with
    dt = (t'_i - t'_{i+1})/num_timesteps and, last, t'_{n-1}/num_timesteps, so the steps add up to t'_0.
    Returns the final latent (float32), and the list of latents after every step if asked.

    Mask strategy (image/video conditioning, as Open-Sora's RFLOW.sample): `cond_mask` [B, T] is 1 for
    frames to generate and the edit ratio at frames whose clean latent is `cond_latent` [B, C, T, H, W].
    Those frames are copied into z; each step a frame generates when mask*num_timesteps >= t (x_mask,
    else the model sees it at timestep 0), is noised to level t when it starts to (edit ratios in (0, 1)),
    and is reset to its clean value after the step when it does not generate.
    """
    ts = timesteps(sched, steps, height, width, num_frames).to(noise.device)
    B, C = noise.shape[:2]
    y = torch.cat([y_cond, y_uncond])
    mask2 = torch.cat([mask, mask])
    sizes = {k: torch.full((2 * B,), float(v), device=noise.device) for k, v in (("fps", fps), ("height", height), ("width", width))}
    z = noise.float()
    if cond_mask is not None:
        keep = (cond_mask < 1)[:, None, :, None, None]
        z = torch.where(keep, cond_latent.float(), z)
        noised = cond_mask == 1
    latents = []
    for i, t in enumerate(ts):
        x_mask = None
        if cond_mask is not None:
            x0 = z.clone()
            upper = cond_mask * sched.num_timesteps >= t
            u = t / sched.num_timesteps
            fresh = (upper & ~noised)[:, None, :, None, None]
            z = torch.where(fresh, (1 - u) * x0 + u * torch.randn_like(x0), x0)
            noised, x_mask = upper, torch.cat([upper, upper]).float()
        v = model(torch.cat([z, z]), t.expand(2 * B), y, mask2, **sizes, x_mask=x_mask)[:, :C]
        v_cond, v_uncond = v.chunk(2)
        v = v_uncond + guidance_scale * (v_cond - v_uncond)
        dt = (ts[i] - ts[i + 1] if i + 1 < len(ts) else ts[i]) / sched.num_timesteps
        z = z + v * dt
        if cond_mask is not None:
            z = torch.where(upper[:, None, :, None, None], z, x0)
        if return_intermediates:
            latents.append(z)
    return (z, latents) if return_intermediates else z
