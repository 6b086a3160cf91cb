"""Open-Sora v2.0's calibration capture adapter (its family declaration's `calibration`; the protocol is in
osx.calibration.capture): one `reference_generate_v2` text-to-video run per prompt (seeded noise) and what it
feeds the MMDiT, as osx.runtime.PipelineV2 makes the call.

Denoiser sample at step i: the guidance passes batched as the runtime runs them for text-to-video, the prompt
and the negative prompt rows [2, ...] (the third pass, negative without conditioning, is the second's input
when nothing conditions the video, so the runtime skips it): img = [pack(z_i)] * 2, txt = T5 states of
[prompt, negative], timestep = [t_i] * 2 in the reference dtype (bf16 as Open-Sora, or fp32), y_vec = CLIP
pooled of both, cond = the packed conditioning (zeros), rope_cos / rope_sin = the image tokens' tables of the
video's shape (models_v2.rope_tables).
Only the denoiser is quantizable in v2.0 (T5 overflows below fp32; CLIP is small).
"""

from __future__ import annotations

import numpy as np

from osx.errors import InputError
from osx.models_v2 import OpenSoraV2Config, bucket_sizes, check_frames, image_size, latent_shape, rope_tables
from osx.numeric import format_size
from osx.runtime.sampler_v2 import pack, schedule
from osx.runtime.scheduler import to_reference

F32 = np.float32


def build(cfg: OpenSoraV2Config, parts: dict | None):
    """The reference's modules in float32, as the bundle runs before quantization (T5 is never below fp32; the
    sampler still rounds to `cfg.sampler.reference_dtype`, as the runtime does): the MMDiT sees the text states
    the runtime gives it (bf16 T5/CLIP would differ from them by ~2 %)."""
    import torch

    from osx.export.pipeline_v2 import build_reference_v2

    return build_reference_v2(cfg, parts=parts, dtype=torch.float32)


def default_size(cfg: OpenSoraV2Config) -> dict:
    d = cfg.defaults
    height, width = image_size(cfg, d.resolution, d.aspect_ratio)
    return {"height": height, "width": width, "num_frames": d.num_frames}


def check_size(cfg: OpenSoraV2Config, height: int, width: int, num_frames: int) -> None:
    """A resolution bucket's size (the runtime, and so the quality gate's videos, run only those), 4k+1 frames."""
    sizes = sorted(set(bucket_sizes(cfg)))
    if (height, width) not in sizes:
        raise InputError(f"{format_size(width, height)} is not one of {cfg.name}'s sizes",
                         hint="pass --width and --height of one: " + ", ".join(format_size(w, h) for h, w in sizes))
    check_frames(cfg, num_frames)


def settings(cfg: OpenSoraV2Config) -> dict:
    s = cfg.sampler
    return {"num_sampling_steps": s.num_steps, "guidance_scale": s.guidance, "fps": s.fps, "motion_score": s.motion_score,
            "reference_dtype": s.reference_dtype}


def timesteps(cfg: OpenSoraV2Config, height: int, width: int, num_frames: int) -> list[float]:
    _, T, h, w = latent_shape(cfg, height, width, num_frames)
    return schedule(cfg.sampler, cfg.sampler.num_steps, h * w // cfg.mmdit.patch_size**2, T)[:-1]


def record(model, prompt: str, seed: int, steps: list[int], recipe: dict) -> dict[str, list[dict]]:
    from osx.export.pipeline_v2 import reference_generate_v2

    r = reference_generate_v2(model, prompt, height=recipe["height"], width=recipe["width"],
                              num_frames=recipe["num_frames"], seed=seed)
    return {"denoiser": [denoiser_inputs(model.cfg, r, i) for i in steps]}


def denoiser_inputs(cfg: OpenSoraV2Config, r, step: int) -> dict[str, np.ndarray]:
    """The denoiser call of step `step` of reference run `r` (ComponentSpec names), prompt and negative rows."""
    p, dtype = cfg.mmdit.patch_size, cfg.sampler.reference_dtype
    _, _, T, h, w = r.noise.shape
    z = r.noise if step == 0 else r.latents[step - 1]
    cond = to_reference(pack(np.concatenate([r.masks, r.masked_ref], axis=1).astype(F32), p), dtype)
    cos, sin = rope_tables(cfg.mmdit, T, h // p, w // p)
    return {
        "img": np.concatenate([pack(z.astype(F32), p)] * 2),
        "txt": r.txt[:2].astype(F32),
        "timestep": to_reference(np.full(2, r.timesteps[step], F32), dtype),
        "y_vec": r.y_vec[:2].astype(F32),
        "cond": np.concatenate([cond] * 2),
        "rope_cos": cos,
        "rope_sin": sin,
    }
