"""Capture real activations: run the torch reference pipeline over prompts and record what the text
encoder and the denoiser are fed, as the runtime feeds them.

Per prompt, one `reference_generate` run (seeded noise). Text encoder sample: the prompt's
input_ids / attention_mask [1, L]. Denoiser sample at step i: the batched classifier-free-guidance
call, cond and uncond rows together [2, ...]: x = [z_i, z_i], timestep = [t_i, t_i],
y = [text_embeds, y_null], mask = [m, m], fps / height / width (pixels), as osx.runtime.Pipeline
makes the call.

Calibration prompts record `steps_per_sample` steps each, stratified: the schedule is cut into that
many equal strata and prompt k takes offset k (mod the stratum length) in each, so a handful of
prompts covers every step from t=1000 down to the last. Held-out prompts record every step (the gate
reports error per step). Calibrating below the target resolution / frame count is allowed; the
recipe records what was used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from osx import __version__
from osx.calibration.calibset import FORMAT, FORMAT_VERSION, MANIFEST, CalibrationSet, recipe_hash
from osx.calibration.shards import ShardWriter
from osx.errors import OsxError
from osx.files import check_replaceable, make_temp_dir, replace_folder
from osx.models import ModelConfig

DEFAULT_SHARD_MB = 256.0


def pick_prompts(prompts: list[str], n: int) -> list[str]:
    """`n` prompts spread evenly over the list (the files are grouped by theme), in file order."""
    if n < 1:
        raise OsxError(f"--samples must be at least 1, got {n}")
    if n >= len(prompts):
        return list(prompts)
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, n).round().astype(int)]


def stratified_steps(num_steps: int, per_sample: int, sample_index: int) -> list[int]:
    """Step indices for one calibration prompt: one per stratum, offset rotating with the prompt."""
    if per_sample >= num_steps:
        return list(range(num_steps))
    stride = num_steps / per_sample
    offset = sample_index % math.ceil(stride)
    return sorted({min(int(j * stride) + offset, num_steps - 1) for j in range(per_sample)})


def make_recipe(model_cfg: ModelConfig, weights: str, *, prompts: list[str], heldout_prompts: list[str],
                samples: int, heldout: int, steps_per_sample: int, height: int, width: int, num_frames: int,
                seed: int, shard_mb: float) -> dict:
    """Everything that decides the shards, with the timesteps the sampler will visit."""
    from osx.export.sampler import timesteps

    sched = model_cfg.scheduler
    steps = sched.num_sampling_steps
    ts = timesteps(sched, steps, height, width, num_frames).tolist()

    def split(chosen: list[str], first_seed: int, per_sample: int) -> dict:
        picks = [stratified_steps(steps, per_sample, k) for k in range(len(chosen))]
        return {"prompts": chosen, "seeds": [first_seed + k for k in range(len(chosen))],
                "steps": picks, "timesteps": [[ts[i] for i in p] for p in picks]}

    cal = pick_prompts(prompts, samples)
    held = pick_prompts(heldout_prompts, heldout)
    overlap = sorted(set(cal) & set(held))
    if overlap:
        raise OsxError(f"{len(overlap)} held-out prompts are also calibration prompts, e.g. {overlap[0]!r}",
                       hint="the quality gate must run on prompts never used for calibration")
    return {
        "osx_capture": 1,  # bump when what a sample holds changes
        "model": {"name": model_cfg.name, "weights": weights},
        "height": height, "width": width, "num_frames": num_frames,
        "target": {"height": model_cfg.defaults.height, "width": model_cfg.defaults.width,
                   "num_frames": model_cfg.defaults.num_frames},
        "num_sampling_steps": steps, "guidance_scale": sched.guidance_scale, "fps": sched.fps,
        "shard_mb": shard_mb,
        "calibration": split(cal, seed, steps_per_sample),
        "heldout": split(held, seed + 1_000_000, steps),  # seeds apart from the calibration ones
    }


def _is_calibration_set(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def capture(model, out: str | os.PathLike, recipe: dict, *, force: bool = False,
            say: Callable[[str], None] = lambda m: None) -> CalibrationSet:
    """Run `model` (export.reference.ReferenceModel) per the recipe and write the calibration set to
    `out` atomically (a temp folder renamed into place when complete)."""
    from osx.export.pipeline import reference_generate

    out = Path(out).absolute()
    check_replaceable(out, force, ours=_is_calibration_set, what="an osx calibration set", option="--out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        cap = int(recipe["shard_mb"] * 2**20)
        shards: dict[str, dict[str, list]] = {}
        for split in ("calibration", "heldout"):
            plan = recipe[split]
            writers = {c: ShardWriter(tmp / split, c, cap) for c in ("text_encoder", "denoiser")}
            for k, (prompt, seed, steps) in enumerate(zip(plan["prompts"], plan["seeds"], plan["steps"])):
                say(f"{split} {k + 1}/{len(plan['prompts'])}: {prompt[:60]}")
                r = reference_generate(model, prompt, height=recipe["height"], width=recipe["width"],
                                       num_frames=recipe["num_frames"], seed=seed)
                writers["text_encoder"].add({"input_ids": r.input_ids, "attention_mask": r.attention_mask})
                for i in steps:
                    writers["denoiser"].add(denoiser_inputs(r, i, recipe, model.model_cfg.scheduler.reference_dtype))
            shards[split] = {c: w.close() for c, w in writers.items()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"osx {__version__}",
                    "hash": recipe_hash(recipe), "recipe": recipe, "shards": shards}
        (tmp / MANIFEST).write_text(_json(manifest))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CalibrationSet.open(out)


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


def _json(o) -> str:
    import json

    return json.dumps(o, indent=2) + "\n"
