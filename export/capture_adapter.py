"""Open-Sora v1.2's calibration capture adapter (its family declaration's `calibration`; the protocol is in
osx.calibration.capture): one `reference_generate` run per prompt (seeded noise) and what it feeds T5 and STDiT3.

Text encoder sample: the prompt's input_ids / attention_mask [1, L]. Denoiser sample at step i: the batched
classifier-free-guidance call, cond and uncond rows together [2, ...]: x = [z_i, z_i], timestep = [t_i, t_i],
y = [text_embeds, y_null], mask = [m, m], fps / height / width (pixels), as osx.runtime.Pipeline makes the call.
"""

from __future__ import annotations

import numpy as np

from osx.models import ModelConfig


def build(cfg: ModelConfig, parts: dict | None):
    from osx.export.reference import build_reference

    return build_reference(cfg, checkpoint=parts)


def default_size(cfg: ModelConfig) -> dict:
    d = cfg.defaults
    return {"height": d.height, "width": d.width, "num_frames": d.num_frames}


def check_size(cfg: ModelConfig, height: int, width: int, num_frames: int) -> None:
    """Any size the reference runs (it refuses the others when it runs)."""


def settings(cfg: ModelConfig) -> dict:
    s = cfg.scheduler
    return {"num_sampling_steps": s.num_sampling_steps, "guidance_scale": s.guidance_scale, "fps": s.fps,
            "reference_dtype": s.reference_dtype}


def timesteps(cfg: ModelConfig, height: int, width: int, num_frames: int) -> list[float]:
    from osx.export.sampler import timesteps as schedule

    return schedule(cfg.scheduler, cfg.scheduler.num_sampling_steps, height, width, num_frames).tolist()


def record(model, prompt: str, seed: int, steps: list[int], recipe: dict) -> dict[str, list[dict]]:
    from osx.export.pipeline import reference_generate

    r = reference_generate(model, prompt, height=recipe["height"], width=recipe["width"],
                           num_frames=recipe["num_frames"], seed=seed)
    dtype = model.model_cfg.scheduler.reference_dtype
    return {"text_encoder": [{"input_ids": r.input_ids, "attention_mask": r.attention_mask}],
            "denoiser": [denoiser_inputs(r, i, recipe, dtype) for i in steps]}


def denoiser_inputs(r, step: int, recipe: dict, reference_dtype: str = "bf16") -> dict[str, np.ndarray]:
    """The denoiser call of step `step` of reference run `r`, cond and uncond batched (ComponentSpec
    names). timestep / fps / height / width are rounded to the reference dtype as the runtime passes them
    (the graph rounds them again, idempotently)."""
    from osx.runtime.scheduler import to_reference

    z = r.noise if step == 0 else r.latents[step - 1]
    two = lambda v: to_reference(np.full((2,), v, np.float32), reference_dtype)  # noqa: E731
    return {
        "x": np.concatenate([z, z]).astype(np.float32),
        "timestep": two(r.timesteps[step]),
        "y": np.concatenate([r.text_embeds, r.y_null]).astype(np.float32),
        "mask": np.concatenate([r.attention_mask, r.attention_mask]).astype(np.int64),
        "fps": two(r.fps),
        "height": two(recipe["height"]),
        "width": two(recipe["width"]),
        "x_mask": np.ones((2, z.shape[2]), np.float32),  # text-to-video: every frame generated
    }
