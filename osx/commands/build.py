"""`osx build BUNDLE --gpu auto`: build (or rebuild) TensorRT engines on this machine from the ONNX in a
bundle, so a team can ship one bundle and let every machine build for its own card.

The bundle is rewritten atomically: a new folder beside it gets the same files (hard links where the
filesystem allows, copies otherwise) plus the new engines, then replaces the old one. Engines for other
GPUs are kept, each with the buckets and settings of its own plan; an engine for the same target (compute
capability, TensorRT version, compatibility level and precision) is replaced (ComponentEntry.with_engine).
The bundle-wide runtime settings and plan report (the export's) are left as they are.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from osx.errors import OsxError


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed
        shutil.copy2(src, dst)


def bundle_plan(bundle, profile, precision: str = "auto"):
    """The plan for what `bundle` holds: its family's pipeline, plus the components exported on request (the
    VAE encoder; an optional set such as Open-Sora v2.0's t2i, planned with the family planner's with_SET)
    where the bundle has them, as `osx export` planned them."""
    from osx.families import get_family
    from osx.profiles import plan_that_fits

    family = get_family(bundle.manifest.model["family"])
    sets = [s for s in family.optional_sets if all(n in bundle.components for n in family.optional_set(s))]
    plan = plan_that_fits(profile, bundle.model_config(), precision, **{f"with_{s}": True for s in sets})
    on_request = {c.name for c in family.components if not c.in_pipeline}
    plan.components = {n: c for n, c in plan.components.items() if n not in on_request or n in bundle.components}
    return plan


@click.command("build")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--gpu", default="auto", show_default=True, help="auto (read this GPU), a profile name, or a profile .toml.")
@click.option("--precision", default="auto", show_default=True, help="Denoiser precision (auto: the profile's).")
@click.option("--portable", is_flag=True, help="Ampere+ hardware-compatible, version-compatible engines (slower, but one "
              "build serves every Ampere-or-newer GPU and needs only TensorRT's lean/dispatch runtime).")
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache (default: beside the bundle, per TensorRT version and GPU).")
@click.option("--dry-run", is_flag=True, help="Print the plan and lint the bundle's ONNX; build nothing.")
def build(bundle_dir: Path, gpu: str, precision: str, portable: bool, timing_cache: Path | None, dry_run: bool):
    """Build (or rebuild) TensorRT engines for this machine's GPU from the bundle's ONNX graphs."""
    from osx.bundle import MANIFEST, Bundle, BundleWriter
    from osx.profiles import detect_profile, load_profile, render_plan

    bundle = Bundle.open(bundle_dir)
    if gpu == "auto":
        profile, why = detect_profile()
        click.echo(why)
    else:
        profile = load_profile(gpu)
    if profile.is_cpu:
        raise OsxError("the cpu profile has no engines to build", hint="pass --gpu auto or a GPU profile")
    plan = bundle_plan(bundle, profile, precision)
    click.echo(render_plan(plan))
    missing = [n for n, c in plan.components.items() if c.backend == "tensorrt" and n not in bundle.components]
    if missing:
        raise OsxError(f"{bundle_dir}: the plan builds {', '.join(missing)}, which the bundle does not have",
                       hint=f"it has {', '.join(bundle.components)}")
    components = {n: bundle.components[n] for n, c in plan.components.items() if c.backend == "tensorrt"}
    if dry_run:
        from osx.export.engines import onnx_source
        from osx.export.lint import lint_onnx

        for name, entry in components.items():
            source, cast_from = onnx_source(entry, plan.components[name].precision)
            if cast_from is not None:  # what the build will cast: lint the graph it comes from
                click.echo(f"{name}: the build casts {cast_from} to {plan.components[name].precision} ({source})")
                source = cast_from
            issues = lint_onnx(bundle.path(source))
            click.echo(f"lint {name} ({source}): " + ("ok" if not issues else f"{len(issues)} issues"))
            for i in issues[:20]:
                click.echo(f"  {i}")
        return

    from osx.export.engines import build_engines, check_build_machine
    from osx.engine_key import this_machine

    check_build_machine(plan, this_machine(), portable)  # before linking or copying anything
    with BundleWriter(bundle_dir, force=True) as w:
        for rel in bundle.manifest.files:
            _link_or_copy(bundle.path(rel), w.dir / rel)
        built = build_engines(w.dir, components, plan, portable=portable, timing_cache=timing_cache, bundle_path=bundle_dir)
        manifest = bundle.manifest.replace(components={n: c.with_engine(built[n]) if n in built else c
                                                      for n, c in bundle.manifest.components.items()})
        # Engines this build replaced are no longer referenced: drop their files from the new folder.
        kept = {e.file for c in manifest.components.values() for e in c.engines}
        for rel in bundle.manifest.files:
            if rel.startswith("engines/") and rel not in kept:
                (w.dir / rel).unlink()
        w.commit(manifest)
    click.echo(f"engines written to {bundle_dir / 'engines'}; {MANIFEST} updated")
