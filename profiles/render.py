"""The plan as a table (`osx export --dry-run`) or JSON (`--json`), with the lint result when ONNX is given."""

from __future__ import annotations

import json
from pathlib import Path

from osx.profiles.planner import Plan, gib, make_plan


def _dims(profile: dict) -> str:
    parts = []
    for d, r in profile.items():
        short = {"batch": "B", "latent_frames": "T", "latent_height": "H", "latent_width": "W", "frames": "F"}.get(d, d)
        parts.append(f"{short}={r.min}" if r.min == r.max else f"{short}={r.min}..{r.max}")
    return " ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def render_plan(plan: Plan) -> str:
    p = plan.profile
    budget = f"{gib(plan.budget_bytes)} usable of {p.vram_gib:g} GiB" if plan.budget_bytes else "host RAM (not planned)"
    head = [
        f"plan: {plan.model.name} on {p.name} ({p.display_name}, compute capability {p.cc_text}, {budget})",
        f"backend {plan.backend}; " + ("components loaded one at a time" if plan.load_one_at_a_time else "all components resident")
        + f"; denoiser batch {'2 (cond + uncond together)' if plan.cfg_batching else '1 (cond, uncond in turn)'}"
        + f"; VAE decodes {plan.vae_chunk_latent_frames} latent frames per call",
        "shapes: " + (", ".join(b.name for b in plan.buckets) + (" (one dynamic range)" if p.dynamic_shapes else " (static buckets)")
                      if plan.buckets else "the model's full dynamic ranges"),
        "",
    ]
    rows = [("component", "precision", "runs on", "params", "weights", "activations", "workspace", "run", "build", "optimisation profiles")]
    for c in plan.components.values():
        rows.append((c.name, c.precision + ("*" if c.needs_calibration else ""), f"{c.backend} ({c.device})",
                     _count(c.params), gib(c.weight_bytes), gib(c.activation_bytes),
                     gib(c.workspace_bytes), gib(c.run_bytes), gib(c.build_bytes),
                     f"{len(c.profiles)}: " + " | ".join(_dims(x) for x in c.profiles[:3]) + (" | ..." if len(c.profiles) > 3 else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    tail = [""]
    if plan.budget_bytes:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        tail.append(f"GPU peak: {gib(plan.run_peak_bytes)} to run, {gib(plan.build_peak_bytes)} to build, "
                    f"budget {gib(plan.budget_bytes)}: {verdict}")
    if plan.host_peak_bytes:
        tail.append(f"host RAM for CPU components: {gib(plan.host_peak_bytes)}")
    tail += [f"note: {n}" for n in plan.notes]
    if any(c.needs_calibration for c in plan.components.values()):
        tail.append("* INT8/FP8: explicit quantization (QDQ) from `osx calibrate`, built strongly typed")
    return "\n".join(head + table + tail)


def dry_run(gpu: str, model_name: str, precision: str = "auto", as_json: bool = False,
            onnx: dict[str, str | Path] | None = None, trt_version: str | None = None) -> str:
    """What `osx export --gpu GPU --model MODEL --dry-run [--json]` prints: the plan, and the TensorRT
    lint of each ONNX graph in `onnx` ({component: path}) when given. Raises OsxError if it does not fit."""
    from osx.models import get_model_config
    from osx.profiles import detect_profile, load_profile

    explanation = None
    if gpu == "auto":
        profile, explanation = detect_profile()
    else:
        profile = load_profile(gpu)
    plan = make_plan(profile, get_model_config(model_name), precision)
    lint = {}
    for comp, path in (onnx or {}).items():
        from osx.export.lint import lint_onnx  # needs onnx (the export extra)

        lint[comp] = lint_onnx(path, trt_version)
    if as_json:
        d = plan.to_dict()
        if explanation:
            d["detected"] = explanation
        if onnx:
            d["lint"] = {c: [i.to_dict() for i in issues] for c, issues in lint.items()}
        return json.dumps(d, indent=2)
    out = ([explanation, ""] if explanation else []) + [render_plan(plan)]
    for comp, issues in lint.items():
        errors = [i for i in issues if i.severity == "error"]
        out.append(f"lint {comp}: " + ("ok" if not issues else f"{len(errors)} errors, {len(issues) - len(errors)} warnings"))
        out += [f"  {i}" for i in issues[:20]] + ([f"  ... {len(issues) - 20} more"] if len(issues) > 20 else [])
    return "\n".join(out)
