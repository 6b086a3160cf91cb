"""`osx export`: a checkpoint (or seeded random weights) -> a validated bundle (osx.export.exporter)."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from osx.commands.weights import weight_files, weight_options
from osx.families import MODELS, REFERENCE_DTYPES


def _terminated(signum, frame):
    # SIGTERM (kill, a CI timeout) unwinds like Ctrl-C, so the bundle's temporary folder is removed.
    raise KeyboardInterrupt


@click.command("export")
@click.option("--model", "model_name", required=True, help=f"Model name: {', '.join(MODELS)}.")
@weight_options
@click.option("--gpu", default="cpu", show_default=True,
              help="GPU profile the bundle is planned for: a shipped name (rtx4090, ...), a .toml path, auto, or cpu.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Bundle folder to write (not needed with --dry-run).")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--dtype", default="plan", show_default=True,
              help="Float type of the ONNX graphs: plan = each component in the plan's precision (--gpu cpu: fp32; "
              "under int8/fp8 the float graph they are made from: fp16 for TensorRT, fp32 on the CPU), or fp32, fp16, "
              "bf16; per component as denoiser=fp16,text_encoder=bf16 (the rest: plan, or a "
              "bare type among them). The T5 encoder is never fp16 (it overflows) and convolutions never bf16 "
              "(no bf16 Conv before opset 22): fp32 instead.")
@click.option("--reference-dtype", type=click.Choice(REFERENCE_DTYPES), default=None,
              help="The dtype Open-Sora's reference runs in: the denoiser's timestep, fps and size inputs and the "
              "schedule are rounded to it. Default: the family's (bf16 for v1.2, Open-Sora's default inference); "
              "fp32 reproduces an fp32 Open-Sora run.")
@click.option("--component", "only", multiple=True,
              help="Export only this component (repeatable): a partial bundle, for re-exports and benchmarks.")
@click.option("--precision", default="auto", show_default=True,
              help="Denoiser precision for the plan (auto = the profile's; fp32, bf16, fp16, int8, fp8).")
@click.option("--calibration", type=click.Path(path_type=Path), default=None,
              help="Calibration set from `osx calibrate`, for --precision int8/fp8.")
@click.option("--int8-method", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="INT8 run by onnxruntime (CPU): static Q/DQ with calibrated ranges, or dynamic (int8 weights, "
              "activations quantized per call); both pass the quality gate on --calibration's held-out set.")
@click.option("--allow-quality-loss", is_flag=True, help="Keep an int8/fp8 bundle that fails the quality gate.")
@click.option("--gate-min-cosine", type=float, default=0.99, show_default=True,
              help="Quality gate: least cosine similarity of a quantized component's output vs full precision, per step.")
@click.option("--gate-min-psnr", type=float, default=30.0, show_default=True,
              help="Quality gate: least PSNR (dB) of any decoded frame vs the full-precision video, same seed.")
@click.option("--opset", type=click.IntRange(18, 20), default=18, show_default=True, help="ONNX opset (18-20).")
@click.option("--with-vae-encoder/--without-vae-encoder", default=None,
              help="Export the VAE encoder, which `osx generate --image/--video/--extend` needs; "
                   "default: on where the model family supports them (Open-Sora v1.2, v2.0).")
@click.option("--with-t2i", is_flag=True, help="Open-Sora v2.0: also Flux.1-dev and its AE decoder (flux1-dev.safetensors, "
              "flux1-dev-ae.safetensors in --checkpoint, or --flux/--flux-ae), the image step of text-to-image-to-video "
              "(`osx generate --t2i2v`, the default for such a bundle); with --dry-run, plan them (both 12B transformers).")
@click.option("--portable", is_flag=True, help="TensorRT engines for every Ampere-or-newer GPU, version-compatible "
              "(slower; end users need only TensorRT's dispatch/lean runtime).")
@click.option("--dry-run", is_flag=True, help="Print the plan for --gpu (precision, shapes, memory, fit) and exit; no GPU needed.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: print the plan as JSON.")
def export(model_name, random_weights, checkpoint, gpu, out, force, dtype, reference_dtype, only, precision, calibration,
           int8_method, allow_quality_loss, gate_min_cosine, gate_min_psnr, opset, with_vae_encoder, with_t2i, portable, dry_run,
           as_json, **weights):
    """Export a model to a bundle: every component to ONNX, validated against PyTorch with onnxruntime
    at two shapes; the manifest, tokenizer and null caption beside them. Written atomically."""
    from osx.families import get_model_config

    if dry_run:
        from osx.profiles import dry_run as plan_text

        click.echo(plan_text(gpu, model_name, precision, as_json=as_json, with_t2i=with_t2i))
        return
    get_model_config(model_name)  # an unknown name fails before torch is imported
    if as_json or out is None:
        raise click.UsageError("--json needs --dry-run" if as_json else "--out is required (except with --dry-run)")
    from osx.export.exporter import export_bundle
    from osx.export.request import ExportRequest

    signal.signal(signal.SIGTERM, _terminated)
    from osx.calibration.apply import QuantizeStep
    from osx.calibration.gate import Thresholds

    quantize = QuantizeStep(calibration, Thresholds(min_cosine=gate_min_cosine, min_psnr=gate_min_psnr), allow_quality_loss,
                            int8_method=int8_method)
    manifest = export_bundle(ExportRequest(
        model_name, out, weight_files(random_weights, checkpoint, weights), gpu=gpu, dtype=dtype, precision=precision,
        quantize=quantize, force=force, opset=opset, portable=portable, only=tuple(only), reference_dtype=reference_dtype,
        with_components=None if with_vae_encoder is None else ("vae_encoder",) if with_vae_encoder else (),
        with_sets=("t2i",) if with_t2i else (), progress=lambda m: click.echo(m, err=True),
    ))
    worst = max(r["max_rel"] for c in manifest.components.values() for r in c.report["validation"]["rows"])
    click.echo(f"{out}: {', '.join(manifest.components)} validated (worst relative error {worst:.1e}); "
               f"run `osx bundle verify {out}`")
    if q := manifest.quantization:
        click.echo(f"{out}: quality gate {'passed' if q['passed'] else 'FAILED (kept by --allow-quality-loss)'}; "
                   f"report: {out}/{q['files'][0]}")
