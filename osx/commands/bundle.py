"""`osx bundle info|verify|pack|unpack`: look inside, check, and ship bundles (folders or .osx.tar)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from osx import archive
from osx.errors import BundleError
from osx.numeric import format_bytes

_PATH = click.Path(exists=True, path_type=Path)


@click.group("bundle")
def bundle():
    """Inspect, verify, pack and unpack bundles. Each command takes a bundle folder or a .osx.tar archive."""


# --- info ---------------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]], indent: str = "  ") -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header] + rows:
        click.echo(indent + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _dims(io) -> str:
    return ", ".join(f"{d} {r.min}..{r.max} (opt {r.opt})" for d, r in io.dims.items())


def _tensor_rows(io) -> list[list[str]]:
    return [[direction, t.name, io.dtype_of(t), "[" + ", ".join(str(d) for d in t.shape) + "]"]
            for direction, tensors in (("in", io.inputs), ("out", io.outputs)) for t in tensors]


def _engine_needs(entry) -> list[str]:
    """[precision, built on, needs GPU, needs TensorRT] of one engine entry, from its key."""
    key = entry.key
    needs_gpu = ("compute capability >= 8.0 (Ampere+)" if key["hardware_compatibility"] == "ampere_plus"
                 else f"compute capability {key['compute_capability']}")
    trt = key["tensorrt_version"]
    needs_trt = f">= {trt} (version-compatible)" if key["version_compatible"] else trt
    return [key.get("precision", "-"), key.get("gpu_name") or "-", needs_gpu, needs_trt]


def _buckets(entry) -> str:
    return ", ".join(f"{w}x{h}x{f}" for h, w, f in entry.buckets()) or "-"


@bundle.command("info")
@click.argument("path", type=_PATH)
def info(path: Path):
    """What a bundle holds: components, precision, backend, shapes and ranges, sizes, and for TensorRT
    engines the GPU, compute capability and TensorRT version each one needs and the shapes (WxHxframes)
    it runs. Does not check checksums (use `osx bundle verify`)."""
    manifest, kind = archive.open_manifest(path)
    files = manifest.files
    size_of = lambda rels: sum(files[r].bytes for r in rels if r in files)  # noqa: E731
    model = manifest.model
    click.echo(f"bundle    {path} ({kind}, format {manifest.format_version}, {manifest.created_by or 'unknown writer'})")
    click.echo(f"model     {model['name']} (family {model['family']})")
    if manifest.plan:
        click.echo(f"planned   for {manifest.plan.get('name', '?')} ({manifest.plan.get('display_name', '')})")
    if manifest.build:
        click.echo("build     " + ", ".join(f"{k} {v}" for k, v in manifest.build.items() if isinstance(v, (str, int, float))))

    click.echo("\ncomponents")
    comps = manifest.components
    _table(["name", "backend", "precision", "file", "size"],
           [[name, c.backend, c.precision, c.file, format_bytes(size_of(c.referenced_files()))] for name, c in comps.items()])

    click.echo("\nshapes")
    for name, c in comps.items():
        click.echo(f"  {name}: {_dims(c.io) or 'all dimensions fixed'}")
        _table(["", "tensor", "dtype", "shape"], _tensor_rows(c.io), indent="    ")

    click.echo(f"\ngenerate  {_generate_limits(manifest)}")

    engines = [(name, e) for name, c in comps.items() for e in c.engines]
    if engines:
        click.echo("\nTensorRT engines (each runs only on the GPU and TensorRT version it needs)")
        _table(["component", "file", "precision", "built on", "needs GPU", "needs TensorRT", "shapes", "size"],
               [[name, e.file, *_engine_needs(e), _buckets(e), format_bytes(size_of([e.file]))] for name, e in engines])

    tok = manifest.tokenizer
    click.echo(f"\ntokenizer {tok['file']} (max_length {tok['max_length']})")
    if manifest.scheduler:
        click.echo("scheduler " + ", ".join(f"{k} {v}" for k, v in manifest.scheduler.items() if isinstance(v, (str, int, float))))
    click.echo(f"files     {len(files)}, {format_bytes(size_of(files))} (+ {archive.MANIFEST})")


def _generate_limits(manifest) -> str:
    """The pixel sizes and frame counts `osx generate` accepts on onnxruntime (the manifest's ONNX ranges);
    TensorRT engines run the shapes listed with each engine below."""
    from osx.runtime.pipeline import pipeline_class

    comps = manifest.components
    if "denoiser" not in comps or "vae_decoder" not in comps:
        return "- (no denoiser and VAE decoder: not a text-to-video bundle)"
    return pipeline_class(manifest).describe_onnx_limits(manifest)  # the pipeline of the bundle's family


# --- verify / pack / unpack -----------------------------------------------------------------------------


@bundle.command("verify")
@click.argument("path", type=_PATH)
def verify(path: Path):
    """Check the manifest schema, every file's size and sha256, and that nothing is missing or extra.
    Exit 0 with one OK line; exit 1 naming the bad file."""
    try:
        manifest = archive.verify_path(path)
    except BundleError as e:
        click.secho(f"FAILED: {e.message}", fg="red", err=True)
        if e.hint:
            click.echo(f"  hint: {e.hint}", err=True)
        sys.exit(1)
    total = sum(m.bytes for m in manifest.files.values())
    click.echo(f"OK: {path}: {len(manifest.files)} files + {archive.MANIFEST}, {format_bytes(total)}, all sha256 match")


@bundle.command("pack")
@click.argument("bundle_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="archive to write, e.g. model.osx.tar")
@click.option("--force", is_flag=True, help="replace an existing archive")
def pack(bundle_dir: Path, out: Path, force: bool):
    """Pack a bundle folder into one deterministic .osx.tar (same bundle, same bytes)."""
    manifest = archive.pack(bundle_dir, out, force=force)
    click.echo(f"packed {bundle_dir} -> {out}: {len(manifest.files)} files + {archive.MANIFEST}, {format_bytes(out.stat().st_size)}")


@bundle.command("unpack")
@click.argument("archive_path", metavar="ARCHIVE", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="replace an existing folder")
def unpack(archive_path: Path, out_dir: Path, force: bool):
    """Unpack an archive into DIR. Unsafe members (absolute paths, `..`, links, devices) are refused and
    every checksum is verified before DIR appears."""
    b = archive.unpack(archive_path, out_dir, force=force)
    click.echo(f"unpacked {archive_path} -> {out_dir}: {len(b.manifest.files)} files + {archive.MANIFEST}, all sha256 match")


# --- triton -------------------------------------------------------------------------------------------


@bundle.command("triton")
@click.argument("bundle_dir", type=_PATH)
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
def triton(bundle_dir: Path, out: Path):
    """Write a Triton model repository to OUT (a new folder): one model per component and a Python-backend
    pipeline model (README "Serving with Triton")."""
    from osx.runtime.serving.triton import write_repository

    models = write_repository(bundle_dir, out)
    click.echo(f"wrote {out}: {', '.join(models)}; run: tritonserver --model-repository={out.resolve()}")
