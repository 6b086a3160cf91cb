"""`osx calibrate [BUNDLE]`: capture real activations for INT8/FP8 quantization (`osx export --calibration DIR`)."""

from __future__ import annotations

from pathlib import Path

import click

from osx.commands.weights import weight_files, weight_options
from osx.families import MODELS, REFERENCE_DTYPES


def from_bundle(bundle_dir: Path, model_name: str | None, reference_dtype: str | None, given):
    """(model config at the bundle's reference dtype, WeightFiles) of a bundle `osx export` wrote: its weights as its
    manifest records them (the random seed, or the checkpoint parts' paths), unless the options name others."""
    from osx.bundle import Bundle
    from osx.errors import OsxError
    from osx.export.request import RANDOM_WEIGHTS, WeightFiles

    bundle = Bundle.open(bundle_dir, verify=False)
    cfg = bundle.model_config()
    if model_name is not None and model_name != cfg.name:
        raise OsxError(f"--model {model_name}: {bundle_dir} holds {cfg.name}", hint="drop --model (the bundle names its model)")
    ref = getattr(getattr(cfg, "scheduler", None), "reference_dtype", None)
    if reference_dtype is not None and reference_dtype != ref:
        raise OsxError(f"--reference-dtype {reference_dtype}: {bundle_dir} was exported at {ref}",
                       hint="drop --reference-dtype (the bundle's is used), or re-export the bundle with it")
    if given.random or given.checkpoint is not None or given.parts:
        return cfg, given
    recorded = bundle.manifest.export.get("weights")
    if not isinstance(recorded, dict) or not recorded:
        raise OsxError(f"{bundle_dir}: the manifest does not record the weights it was exported from",
                       hint="pass them: --checkpoint DIR or --random-weights")
    if "random_seed" in recorded:
        if recorded["random_seed"] != cfg.random_init_seed:
            raise OsxError(f"{bundle_dir}: exported with random seed {recorded['random_seed']}, this osx seeds "
                           f"{cfg.name} with {cfg.random_init_seed}", hint="re-export the bundle with this osx")
        return cfg, RANDOM_WEIGHTS
    return cfg, WeightFiles(parts={part: Path(path) for part, path in recorded.items()})


@click.command("calibrate")
@click.argument("bundle_dir", metavar="[BUNDLE]", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "model_name", default=None,
              help=f"Model name: {', '.join(MODELS)}. Not needed with BUNDLE (an `osx export` bundle names its model, "
                   "reference dtype and weights).")
@weight_options
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Calibration prompts, one per line ('#' comments). Default: the shipped set of 75.")
@click.option("--heldout-prompts", "heldout_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Held-out prompts for the quality gate; must not overlap --prompts. Default: the shipped set of 18.")
@click.option("--samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Calibration prompts to run (spread over the file); bounds the work.")
@click.option("--heldout", type=click.IntRange(min=1), default=4, show_default=True, help="Held-out prompts to run.")
@click.option("--steps-per-sample", type=click.IntRange(min=1), default=6, show_default=True,
              help="Denoiser steps recorded per calibration prompt, stratified over the schedule.")
@click.option("--height", type=int, default=None, help="Pixels (default: the model's). Below the target is allowed and recorded.")
@click.option("--width", type=int, default=None, help="Pixels (default: the model's).")
@click.option("--frames", "num_frames", type=int, default=None, help="Frames (default: the model's).")
@click.option("--reference-dtype", type=click.Choice(REFERENCE_DTYPES), default=None,
              help="The dtype the reference rounds the sampler's values to, as `osx export --reference-dtype` (default: the family's).")
@click.option("--seed", type=int, default=0, show_default=True, help="Noise seed of the first prompt (then +1 per prompt).")
@click.option("--shard-mb", type=click.FloatRange(min=0.01), default=256.0, show_default=True, help="Size cap of one .npz shard.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder to write the calibration set to.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def calibrate(bundle_dir, model_name, random_weights, checkpoint, prompts_file, heldout_file, samples, heldout, steps_per_sample,
              height, width, num_frames, reference_dtype, seed, shard_mb, out, force, **weights):
    """Run the PyTorch reference pipeline over calibration and held-out prompts and record the real inputs
    of the components int8/fp8 can quantize (the denoiser's at steps across the whole schedule, every
    guidance pass of a step in one batch). BUNDLE: the model, reference dtype and weights of that bundle (then
    `osx export ... --calibration OUT` quantizes a bundle of the same weights)."""
    from osx.families import family_of, get_model_config

    files = weight_files(random_weights, checkpoint, weights)
    if bundle_dir is not None:
        cfg, files = from_bundle(bundle_dir, model_name, reference_dtype, files)
        reference_dtype = None  # the bundle's config carries it
    elif model_name is None:
        raise click.UsageError("pass --model NAME, or BUNDLE (a folder `osx export` wrote)")
    else:
        cfg = get_model_config(model_name)  # an unknown name fails before torch is imported
    from osx.calibration import capture as cap
    from osx.export.exporter import with_reference_dtype
    from osx.calibration.calibset import weights_identity
    from osx.calibration.prompts import CALIBRATION, HELDOUT, load_prompts
    from osx.numeric import format_size

    family = family_of(cfg)
    cfg = with_reference_dtype(cfg, reference_dtype)
    runs = cap.adapter(family)  # the family's reference run and what it records
    size = runs.default_size(cfg)
    # The same weights `osx export` will load, named the same way (the calibration set records them).
    parts = files.resolve(family)
    recipe = cap.make_recipe(
        cfg, weights_identity(cfg.random_init_seed, parts),
        prompts=load_prompts(prompts_file or CALIBRATION), heldout_prompts=load_prompts(heldout_file or HELDOUT),
        samples=samples, heldout=heldout, steps_per_sample=steps_per_sample,
        height=size["height"] if height is None else height,
        width=size["width"] if width is None else width,
        num_frames=size["num_frames"] if num_frames is None else num_frames,
        seed=seed, shard_mb=shard_mb,
    )
    model = runs.build(cfg, parts)
    cs = cap.capture(model, out, recipe, force=force, say=lambda m: click.echo(m, err=True))
    n = {s: {c: sum(r["samples"] for r in recs) for c, recs in comps.items()} for s, comps in cs.manifest["shards"].items()}
    counts = lambda split: " + ".join(f"{k} {c}" for c, k in n[split].items())  # noqa: E731
    click.echo(f"wrote {out}: calibration hash {cs.hash[:16]}, {counts('calibration')} samples, "
               f"held-out {counts('heldout')} "
               f"({format_size(recipe['width'], recipe['height'], recipe['num_frames'])})")
