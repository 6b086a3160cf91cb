"""Runtime benchmark: the osx runtime (onnxruntime, CPU) vs the torch eager reference, side by side.

    python scripts/bench.py runtime [--steps 10] [--bundle DIR] [--workdir DIR]

Both run the same "small" model (below: the tiny model's architecture at widths where compute
dominates) with the same weights, prompt, noise and steps, each in its own fresh subprocess (the
runtime one with torch made unimportable), with every component already loaded: generation seconds,
seconds per denoising step, the share of a step spent outside the denoiser (scheduler, host copies,
guidance), peak RSS of the process. Plus the import time of each stack and the installed size of the
runtime's dependencies. Targets (reported, not asserted): osx >= 1.5x faster per step, < 1% of a
step outside the denoiser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from osx.models import OPENSORA_V1_2_TINY, DenoiserConfig, GenerationDefaults, TextEncoderConfig

# The tiny model's structure (T5 -> STDiT3 -> causal VAE) at widths where the denoiser's matmuls, not
# per-op overhead, set the pace: 384 wide, 4 spatial + 4 temporal blocks, 640 tokens per call at
# 128x128 px and 34 frames (10 latent frames of 8x8 patches). The VAE stays tiny.
SMALL = dataclasses.replace(
    OPENSORA_V1_2_TINY,
    name="opensora-v1.2-bench-small",
    text_encoder=TextEncoderConfig(vocab_size=1024, d_model=256, d_kv=64, d_ff=512, num_layers=2, num_heads=4, max_length=64),
    denoiser=DenoiserConfig(hidden_size=384, depth=4, num_heads=6, caption_channels=256, model_max_length=64),
    defaults=GenerationDefaults(height=128, width=128, num_frames=34),
    max_height=128, max_width=128, max_frames=51,
)
PROMPT = "A red fox runs through fresh snow at sunrise, cinematic, slow motion."
SEED = 7
RUNTIME_DEPS = ["numpy", "onnxruntime", "tokenizers", "click", "tqdm", "opencv-python-headless"]  # pyproject base

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "transformers", "diffusers", "onnx"}:
            raise ImportError(name + " is blocked: the runtime must not need it")
sys.meta_path.insert(0, _Block())
"""

RUN_OSX = BLOCK_TORCH + """
import json, resource, sys, time
import numpy as np
from osx.runtime import Pipeline
bundle, steps, seed, prompt, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
pipe = Pipeline.load(bundle)
pipe.load_one_at_a_time = False  # keep all three loaded, like the torch side
pipe.preload()
t0 = time.perf_counter()
frames = pipe.generate(prompt, steps=steps, seed=seed)
total = time.perf_counter() - t0
np.save(out, frames)
steps_t = pipe.timings["steps"]
print(json.dumps({
    "total_s": total, "text_encoder_s": pipe.timings["text_encoder_s"], "vae_decode_s": pipe.timings["vae_decode_s"],
    "denoise_s": pipe.timings["denoise_s"], "step_s": [s["total_s"] for s in steps_t],
    "outside_share": [1 - s["denoiser_s"] / s["total_s"] for s in steps_t],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "torch_imported": "torch" in sys.modules}))
"""

RUN_TORCH = """
import json, resource, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[6])
from bench_runtime import SMALL
from osx.export.pipeline import reference_generate
from osx.export.reference import build_reference
from osx.runtime.scheduler import initial_noise
steps, seed, prompt, out = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ref = build_reference(SMALL)
calls = []
ref.denoiser.register_forward_pre_hook(lambda m, a: calls.append([time.perf_counter()]))
ref.denoiser.register_forward_hook(lambda m, a, o: calls[-1].append(time.perf_counter()))
t0 = time.perf_counter()
result = reference_generate(ref, prompt, steps=steps, seed=seed)
total = time.perf_counter() - t0
np.save(out, result.frames)
starts = [c[0] for c in calls] + [calls[-1][1]]
print(json.dumps({
    "total_s": total, "step_s": [b - a for a, b in zip(starts, starts[1:])],
    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads()}))
"""


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bundle", type=Path, help="reuse a bundle this benchmark exported before (skips the export)")
    ap.add_argument("--workdir", type=Path, help="where to export the bundle (default: a temp folder)")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="osx-bench-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or export_small(work / "bundle")

    common = [str(bundle), str(args.steps), str(SEED), PROMPT]
    osx = _child(RUN_OSX, *common, str(work / "osx_frames.npy"))
    ref = _child(RUN_TORCH, *common, str(work / "torch_frames.npy"), str(Path(__file__).parent))
    import numpy as np

    frame_diff = int(np.abs(np.load(work / "osx_frames.npy").astype(int) - np.load(work / "torch_frames.npy")).max())
    # steady state: the first step carries one-off costs (allocator warm-up, ORT's first-run planning)
    osx_step = statistics.median(osx["step_s"][1:] or osx["step_s"])
    torch_step = statistics.median(ref["step_s"][1:] or ref["step_s"])
    return {
        "config": {
            "model": SMALL.name, "why": "tiny architecture at widths where the denoiser's compute dominates",
            "denoiser": {"hidden_size": SMALL.denoiser.hidden_size, "depth": SMALL.denoiser.depth, "heads": SMALL.denoiser.num_heads},
            "text_encoder": {"d_model": SMALL.text_encoder.d_model, "layers": SMALL.text_encoder.num_layers, "max_length": SMALL.text_encoder.max_length},
            "video": {"height": SMALL.defaults.height, "width": SMALL.defaults.width, "frames": SMALL.defaults.num_frames},
            "denoiser_tokens_per_call": 10 * (SMALL.defaults.height // 16) * (SMALL.defaults.width // 16),
            "steps": args.steps, "cfg": "cond + uncond in one batch-2 call (both sides)", "precision": "fp32 (both sides)",
            "cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2), "torch_threads": ref["threads"],
        },
        "osx_onnxruntime_cpu": {
            "total_s": round(osx["total_s"], 3), "per_step_s": round(osx_step, 4),
            "text_encoder_s": round(osx["text_encoder_s"], 3), "vae_decode_s": round(osx["vae_decode_s"], 3),
            "outside_denoiser_share_of_step": round(statistics.median(osx["outside_share"]), 5),
            "peak_rss_mib": round(osx["peak_rss_mib"], 1), "torch_imported": osx["torch_imported"],
        },
        "torch_eager_reference": {"total_s": round(ref["total_s"], 3), "per_step_s": round(torch_step, 4),
                                  "peak_rss_mib": round(ref["peak_rss_mib"], 1)},
        "speedup": {"per_step": round(torch_step / osx_step, 2), "total": round(ref["total_s"] / osx["total_s"], 2),
                    "target_per_step": 1.5},
        "outside_denoiser_target": 0.01,
        "max_frame_difference_uint8": frame_diff,
        "import_s": {"osx_runtime": import_seconds("import osx.runtime, onnxruntime"),
                     "torch_reference": import_seconds("import torch, osx.export.pipeline")},
        "install_mib": {"runtime_base": footprint(RUNTIME_DEPS), "h264_extra_av": footprint(["av"]), "torch_alone": footprint(["torch"])},
        "bundle": str(bundle),
    }


def export_small(out: Path) -> Path:
    """Export SMALL with seeded random weights through the normal exporter (in a subprocess, so this
    process never holds torch)."""
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from bench_runtime import SMALL
        from osx import models
        from osx.export.exporter import export_bundle
        models.MODELS[SMALL.name] = SMALL  # the exporter looks configs up by name
        export_bundle(SMALL.name, {str(out)!r}, gpu="cpu", random_weights=True, force=True, progress=lambda m: None)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def _child(code: str, *args: str) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"benchmark child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def import_seconds(statement: str, repeat: int = 3) -> float:
    """Median wall time of `statement` in a fresh interpreter."""
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    return round(statistics.median(float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                                          check=True).stdout) for _ in range(repeat)), 3)


def footprint(roots: list[str]) -> dict:
    """Installed size (MiB) of `roots` and everything they require (this platform's markers, no extras)."""
    from packaging.markers import Marker

    seen: dict[str, md.Distribution] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if marker and not Marker(marker).evaluate({"extra": ""}):
                continue
            todo.append(re.match(r"\s*([A-Za-z0-9_.\-]+)", spec).group(1))
    sizes = {k: round(sum(_size(f) for f in d.files or []) / 2**20, 1) for k, d in sorted(seen.items())}
    return {"total": round(sum(sizes.values()), 1), "packages": sizes}


def _size(f) -> int:
    try:
        return f.locate().stat().st_size
    except OSError:
        return 0


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
