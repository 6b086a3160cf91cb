"""The plan as a table (`osx export --dry-run`) or JSON (`--json`)."""

from __future__ import annotations

import json

from osx.errors import OsxError
from osx.numeric import format_bytes
from osx.profiles.detect import detect_profile
from osx.profiles.fit import plan_that_fits
from osx.profiles.planner import Plan, machine_ram_bytes
from osx.profiles.profile import load_profile


def _dims(profile: dict) -> str:
    parts = []
    for d, r in profile.items():
        short = {"batch": "B", "latent_frames": "T", "latent_height": "H", "latent_width": "W", "frames": "F"}.get(d, d)
        parts.append(f"{short}={r.min}" if r.min == r.max else f"{short}={r.min}..{r.max}")
    return " ".join(parts)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _denoiser_batch(plan: Plan) -> str:
    rows = max(p["batch"].max for p in plan.components["denoiser"].profiles)
    return f"{rows} (the guidance passes together)" if plan.cfg_batching else "1 (the guidance passes in turn)"


def render_plan(plan: Plan) -> str:
    p = plan.profile
    budget = f"{format_bytes(plan.budget_bytes, 2)} usable of {p.vram_gib:g} GiB" if plan.budget_bytes else "host RAM (not planned)"
    head = [
        f"plan: {plan.model.name} on {p.name} ({p.display_name}, compute capability {p.cc_text}, {budget})",
        f"backend {plan.backend}; " + ("components loaded one at a time" if plan.load_one_at_a_time else "all components resident")
        + f"; denoiser batch {_denoiser_batch(plan)}"
        + f"; VAE decodes {plan.vae_chunk_latent_frames} latent frames per call",
        "shapes: " + (", ".join(b.name for b in plan.buckets) + (" (one dynamic range)" if p.dynamic_shapes else " (static buckets)")
                      if plan.buckets else "the model's full dynamic ranges"),
        "",
    ]
    rows = [("component", "precision", "runs on", "params", "weights", "activations", "workspace", "run", "build", "optimisation profiles")]
    for c in plan.components.values():
        rows.append((c.name, c.precision + ("*" if c.needs_calibration else ""), f"{c.backend} ({c.device})",
                     _count(c.params), format_bytes(c.weight_bytes, 2), format_bytes(c.activation_bytes, 2),
                     format_bytes(c.workspace_bytes, 2), format_bytes(c.run_bytes, 2), format_bytes(c.build_bytes, 2),
                     f"{len(c.profiles)}: " + " | ".join(_dims(x) for x in c.profiles[:3]) + (" | ..." if len(c.profiles) > 3 else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    tail = [""]
    need = format_bytes(plan.host_peak_bytes, 2)
    if plan.budget_bytes:
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        if plan.fits and plan.host_peak_bytes and plan.host_ram_bytes is None:
            verdict += f" if the machine has {need} of RAM for the CPU components"
        tail.append(f"GPU peak: {format_bytes(plan.run_peak_bytes, 2)} to run, {format_bytes(plan.build_peak_bytes, 2)} to build, "
                    f"budget {format_bytes(plan.budget_bytes, 2)}: {verdict}")
    if plan.host_peak_bytes:
        if plan.host_ram_bytes is None:  # planned for a machine this is not: the need is a requirement
            tail.append(f"host RAM: requires {need} for the CPU components (not checked: this is not the machine that runs it)")
        else:
            tail.append(f"host RAM: {need} for the CPU components, this machine has {format_bytes(plan.host_ram_bytes, 2)}: "
                        + ("fits" if plan.host_fits else "DOES NOT FIT"))
    tail += [f"note: {n}" for n in plan.notes]
    if any(c.needs_calibration for c in plan.components.values()):
        tail.append("* INT8/FP8: explicit quantization (QDQ) from `osx calibrate`, built strongly typed")
    return "\n".join(head + table + tail)


def dry_run(gpu: str, model_name: str, precision: str = "auto", as_json: bool = False, with_t2i: bool = False) -> str:
    """What `osx export --gpu GPU --model MODEL --dry-run [--json] [--with-t2i]` prints. Raises OsxError if it
    does not fit."""
    from osx.families import get_model_config
    from osx.models_v2 import T2I_CONFIGS

    explanation = None
    if gpu == "auto":
        profile, explanation = detect_profile()
    else:
        profile = load_profile(gpu)
    model = get_model_config(model_name)
    if with_t2i and model.name not in T2I_CONFIGS:  # the models with a text-to-image step (t2i2v)
        raise OsxError(f"--with-t2i is for text -> image -> video; {model_name} has no text-to-image step",
                       hint=f"use --model {' or '.join(sorted(T2I_CONFIGS))}, or drop --with-t2i")
    options = {"with_t2i": True} if with_t2i else {}
    plan = plan_that_fits(profile, model, precision, machine_ram_bytes() if gpu == "auto" else None, **options)
    if as_json:
        d = plan.to_dict()
        if explanation:
            d["detected"] = explanation
        return json.dumps(d, indent=2)
    return "\n".join(([explanation, ""] if explanation else []) + [render_plan(plan)])
