"""Capture real activations: run the torch reference pipeline over prompts and record what the
quantizable components are fed, as the runtime feeds them.

What one reference run is and what it records is the family's: its declaration names a capture adapter
(`Family.calibration`, a module) with
    build(cfg, parts)                        -> the torch reference model (random weights when parts is None)
    default_size(cfg)                        -> {"height", "width", "num_frames"}: the model's default video
    check_size(cfg, height, width, frames)   -> an InputError for a size the runtime would not run
    settings(cfg)                            -> the sampler settings that decide the samples (recorded in the
                                                recipe; "num_sampling_steps" among them)
    timesteps(cfg, height, width, frames)    -> the timestep of each sampling step
    record(model, prompt, seed, steps, recipe) -> {component: [sample, ...]}: one seeded reference run, the
                                                inputs of each quantizable component (the denoiser's at `steps`)
(v1.2: osx.export.capture_adapter, v2.0: osx.export.capture_adapter_v2).

Calibration prompts record `steps_per_sample` steps each, stratified: the schedule is cut into that
many equal strata and prompt k takes offset k (mod the stratum length) in each, so a handful of
prompts covers every step from the first to the last. Held-out prompts record every step (the gate
reports error per step). Calibrating below the target resolution / frame count is allowed; the
recipe records what was used.
"""

from __future__ import annotations

import importlib
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
from osx.families import family_of, get_family
from osx.files import check_replaceable, make_temp_dir, replace_folder

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


def adapter(family):
    """The capture adapter (a module) a family declares; an OsxError where it declares none."""
    if family.calibration is None:
        raise OsxError(f"{family.name} has no calibration capture", hint="int8/fp8 are not available for it; use fp16 or fp32")
    return importlib.import_module(family.calibration)


def make_recipe(model_cfg, weights: str, *, prompts: list[str], heldout_prompts: list[str],
                samples: int, heldout: int, steps_per_sample: int, height: int, width: int, num_frames: int,
                seed: int, shard_mb: float) -> dict:
    """Everything that decides the shards, with the timesteps the sampler will visit."""
    runs = adapter(family_of(model_cfg))
    runs.check_size(model_cfg, height, width, num_frames)
    settings = runs.settings(model_cfg)
    steps = settings["num_sampling_steps"]
    ts = runs.timesteps(model_cfg, height, width, num_frames)

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
        "model": {"name": model_cfg.name, "family": model_cfg.family, "weights": weights},
        "height": height, "width": width, "num_frames": num_frames,
        "target": runs.default_size(model_cfg),
        **settings,
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
    """Run `model` (the family adapter's reference model) per the recipe and write the calibration set to
    `out` atomically (a temp folder renamed into place when complete)."""
    out = Path(out).absolute()
    check_replaceable(out, force, ours=_is_calibration_set, what="an osx calibration set", option="--out")
    family = get_family(recipe["model"]["family"])  # after the folder check: a user's folder is refused first
    record = adapter(family).record
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(f".{out.name}.tmp-", out.parent)
    try:
        cap = int(recipe["shard_mb"] * 2**20)
        shards: dict[str, dict[str, list]] = {}
        for split in ("calibration", "heldout"):
            plan = recipe[split]
            writers = {c: ShardWriter(tmp / split, c, cap) for c in family.quantizable}
            for k, (prompt, seed, steps) in enumerate(zip(plan["prompts"], plan["seeds"], plan["steps"])):
                say(f"{split} {k + 1}/{len(plan['prompts'])}: {prompt[:60]}")
                for component, samples in record(model, prompt, seed, steps, recipe).items():
                    for sample in samples:
                        writers[component].add(sample)
            shards[split] = {c: w.close() for c, w in writers.items()}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "created_by": f"osx {__version__}",
                    "hash": recipe_hash(recipe), "recipe": recipe, "shards": shards}
        (tmp / MANIFEST).write_text(_json(manifest))
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CalibrationSet.open(out)


def _json(o) -> str:
    import json

    return json.dumps(o, indent=2) + "\n"
