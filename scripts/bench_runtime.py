"""Runtime benchmark, fair: osx (onnxruntime, CPU) vs torch eager, per denoising step, side by side.

    python scripts/bench.py runtime [--family opensora-v1.2|opensora-v2.0] [--sizes 64x64,128x128,256x256] [--frames 34] [--steps 5] [--warmup 1]
                                    [--threads N] [--no-int8] [--int8-methods static,dynamic] [--no-int8-search] [--no-openvino]
                                    [--no-ablation] [--workdir DIR] [--prepare-only]

What makes it fair (README "Benchmarks"): both sides run in one process tree, one worker process per
side, each holding its models loaded; the parent asks for one step at a time, interleaved (torch fp32,
torch bf16, osx fp32, osx int8, torch fp32, ...), so load on a shared machine falls on every row alike;
each figure is the median of --steps steps after --warmup steps per row and size. Same thread count on
both sides (default: the machine's physical cores, what the runtime uses): torch with
OMP_WAIT_POLICY=PASSIVE set before it is imported, onnxruntime without spinning (the runtime's session
settings), so no side's idle threads busy-wait on the cores the other needs.

One step is what a generation repeats: the denoiser's cond + uncond call (batch 2), guidance and the
sampler update. torch: the reference sampler (`osx.export.sampler.sample`, one step) over the reference
STDiT3 in float32 and in bfloat16 (what Open-Sora users run). osx: `Pipeline.denoise` (one step) over the
bundle's graphs; fp32, and int8 (the denoiser quantized by `osx export --precision int8` from a
calibration set captured here, static Q/DQ and dynamic, each through the quality gate, whose verdict is
reported beside the speed); with the `openvino` extra installed, the fp32 bundle on `--backend openvino-fp32`
(fp32 throughout) and on `--backend openvino` (bf16 denoiser on AMX; through the same gate's thresholds,
osx.calibration.backend_gate).

The ablation (--ablation-size, default 128x128) measures the onnxruntime session changes one by one,
interleaved with the rows above: the session as shipped before (portable graph, no memory arena,
spinning threads), then + arena, + no spinning, + the graph fused at export without attention fusion,
and the shipped default (+ attention fused into MultiHeadAttention).

--family opensora-v2.0 (scripts/runtime_v2.py): the same schedule over a small v2.0 config; a step is the
t2v sampler's step (text, negative and negative rows, both guidances) over the MMDiT; the INT8 rows quantize
the MMDiT from a calibration set its family's capture adapter records (`cond_in` stays full precision, as the
family declares); the ablation is v1.2 only (its fusions are the v1.2 denoiser's).

Building the bundles (export, calibration capture, the INT8 quality gates and their layer search) takes
far longer than measuring them, so on a machine that is quiet only for a while, build first and measure
later from the same folder:
    python scripts/bench.py runtime --workdir W --prepare-only     # any time, any load
    python scripts/bench.py runtime --workdir W --markdown W/run.md  # the quiet run: measurement only

The model: --model NAME (a registered config), default the family's "small" bench config. Targets are
reported, not asserted: osx fp32 >= 1.5x torch fp32 at 128x128 (onnxruntime's and OpenVINO's fp32 rows, each
shown; met by the faster); the fastest gate-passing osx precision
>= 1.5x torch bf16 at every size; < 1% of an osx step outside the denoiser.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as md
import importlib.util
import json
import os
import re
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
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
    max_height=256, max_width=256, max_frames=51,
)
PROMPT = "A red fox runs through fresh snow at sunrise, cinematic, slow motion."
SEED = 7
RUNTIME_DEPS = ["numpy", "onnxruntime", "tokenizers", "click", "tqdm", "opencv-python-headless"]  # pyproject base
STEP_TIMEOUT_S = 900  # one worker call (a step, or loading) may take at most this long
STEP = {"opensora-v1.2": "one denoising step: cond + uncond denoiser call (batch 2), guidance, sampler update",
        "opensora-v2.0": "one t2v denoising step: MMDiT on text/negative/negative rows (batch 3), both guidances, sampler update"}
TARGET = {"fp32_vs_torch_fp32": 1.5, "best_vs_torch_bf16": 1.5, "outside_denoiser_share": 0.01}

# row -> (worker, what it runs)
ROWS = {"torch fp32": "torch", "torch bf16": "torch", "osx fp32": "osx", "osx openvino fp32": "osx", "osx int8": "osx",
        "osx int8 dynamic": "osx", "osx openvino bf16": "osx"}
INT8 = {"osx int8": "static", "osx int8 dynamic": "dynamic"}  # row -> QuantizeStep.int8_method
OPENVINO = {"osx openvino bf16": "openvino", "osx openvino fp32": "openvino-fp32"}  # row -> backend, over the fp32 bundle
FP32 = ("osx fp32", "osx openvino fp32")  # the bundle's fp32 graphs at fp32: onnxruntime (the default), OpenVINO
ABLATION = {  # name -> (graph, arena, spinning); the last step is the shipped "osx fp32" row
    "ort before: portable graph, no arena, spinning": ("portable", False, True),
    "ort + arena": ("portable", True, True),
    "ort + arena, no spinning": ("portable", True, False),
    "ort + arena, no spinning, fused graph without attention fusion": ("no-attention", True, False),
}


FAMILY_DEFAULTS = {  # family -> (bench model, sizes, frames)
    "opensora-v1.2": (SMALL.name, "64x64,128x128,256x256", 34),
    "opensora-v2.0": ("opensora-v2.0-bench-small", "64x64,96x96", 33),
}


def model_config(name: str):
    from osx.families import get_model_config
    from runtime_v2 import SMALL_V2

    return {SMALL.name: SMALL, SMALL_V2.name: SMALL_V2}.get(name) or get_model_config(name)


# --- the parent: bundles, workers, the interleaved schedule ---------------------------------------------


def main(argv: list[str]) -> dict:
    ap = argparse.ArgumentParser(prog="bench.py runtime", description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILY_DEFAULTS), default="opensora-v1.2")
    ap.add_argument("--model", help="default: the family's bench config")
    ap.add_argument("--sizes", help="HEIGHTxWIDTH,... (default v1.2: 64x64,128x128,256x256; v2.0: 64x64,96x96)")
    ap.add_argument("--frames", type=int, help="default v1.2: 34; v2.0: 33")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per row and size (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="both sides (default: physical cores)")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--int8-methods", default="static,dynamic", help="INT8 rows: static (Q/DQ), dynamic, or both")
    ap.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=True,
                    help="rows for the OpenVINO backend (when the `openvino` extra is installed)")
    ap.add_argument("--int8-search", action=argparse.BooleanOptionalAction, default=True,
                    help="let the quality gate keep layers in fp32 until it passes (slow)")
    ap.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ablation-size", default="128x128")
    ap.add_argument("--workdir", type=Path, help="bundles and calibration go here, reused if present (delete it after "
                    "changing the exporter or the quantizer)")
    ap.add_argument("--markdown", type=Path, help="also write the README's tables of this run to this file")
    ap.add_argument("--prepare-only", action="store_true",
                    help="build the bundles (export, calibration, INT8 quality gates) into --workdir and stop: a later "
                    "run with the same --workdir then only measures (for a quiet machine)")
    args = ap.parse_args(argv)
    if args.steps < 5:
        sys.exit("--steps: at least 5 (the figures are medians)")
    model, sizes, frames = FAMILY_DEFAULTS[args.family]
    args.model, args.sizes, args.frames = args.model or model, args.sizes or sizes, args.frames or frames
    if model_config(args.model).family != args.family:
        sys.exit(f"--model {args.model} is not an {args.family} model")
    if args.family != "opensora-v1.2":  # the ablation's fusions are v1.2's
        args.ablation = False
    from osx.runtime.backends import physical_cores

    threads = args.threads or physical_cores()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="osx-bench-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    t_start = time.perf_counter()

    bundles = {"osx fp32": prepare_bundle(args.model, work / "bundle-fp32")}
    gates = {}
    methods = args.int8_methods.split(",") if args.int8 else []
    for row, method in INT8.items():
        if method in methods:
            folder = work / ("bundle-int8" if method == "static" else f"bundle-int8-{method}")
            bundles[row] = prepare_bundle(args.model, folder, work / "calibration", args.int8_search, method)
            gates[row] = gate_verdict(bundles[row])
    if args.openvino and args.family == "opensora-v1.2" and importlib.util.find_spec("openvino"):
        for row in OPENVINO:
            bundles[row] = bundles["osx fp32"]
        if (work / "calibration").exists():  # captured for the INT8 rows: the bf16 row's gate uses it too
            gates["osx openvino bf16"] = backend_gate_verdict(bundles["osx fp32"], "openvino", work / "calibration",
                                                              work / "gate-openvino.json")
    if args.prepare_only:
        return {"prepared": {k: str(v) for k, v in bundles.items()}, "int8_gates": gates, "workdir": str(work),
                "seconds": round(time.perf_counter() - t_start, 1)}
    rows = [r for r in ROWS if ROWS[r] == "torch" or r in bundles]
    ablation_size = tuple(int(v) for v in args.ablation_size.split("x")) if args.ablation else None

    config = {"model": args.model, "threads": threads, "bundles": {k: str(v) for k, v in bundles.items()},
              "backends": {row: OPENVINO[row] for row in bundles if row in OPENVINO}}
    if ablation_size:  # made here: the osx worker cannot import onnx
        config["no_attention_graph"] = str(_graph_without_attention_fusion(bundles["osx fp32"], work / "graph-no-attention"))
    workers = {"torch": Worker("torch", config, {"OMP_WAIT_POLICY": "PASSIVE"}), "osx": Worker("osx", config)}
    try:
        results = {}
        for h, w in sizes:
            size_rows = rows + (list(ABLATION) if (h, w) == ablation_size else [])
            results[f"{h}x{w}"] = measure(workers, size_rows, (h, w, args.frames), args.steps, args.warmup)
            for row, gate in gates.items():  # the gate's verdict beside the speed
                results[f"{h}x{w}"]["rows"][row]["quality_gate"] = "passed" if gate["passed"] else "failed"
        rss = {name: wk.call({"op": "rss"})["peak_rss_mib"] for name, wk in workers.items()}
    finally:
        for wk in workers.values():
            wk.close()

    cfg = model_config(args.model)
    den = cfg.denoiser if args.family == "opensora-v1.2" else cfg.mmdit
    result = {
        "config": {
            "model": cfg.name, "family": args.family,
            "denoiser": {"hidden_size": den.hidden_size, "depth": den.depth, "heads": den.num_heads,
                         **({"single_blocks": den.depth_single_blocks} if hasattr(den, "depth_single_blocks") else {})},
            "frames": args.frames, "steps_measured": args.steps, "warmup_steps": args.warmup,
            "step": STEP[args.family],
            "schedule": "interleaved, one step of each row in turn; median per row", "threads_both_sides": threads,
            "torch": "OMP_WAIT_POLICY=PASSIVE, torch.set_num_threads(threads), eager", "onnxruntime": ort_settings(threads),
            "cpus": os.cpu_count(), "physical_cores": physical_cores(),
        },
        "load_average": {"before": [round(v, 2) for v in load_before], "after": [round(v, 2) for v in os.getloadavg()]},
        "sizes": {k: v for k, v in results.items()},
        "int8_gates": gates,
        "targets": targets(results, gates),
        "peak_rss_mib": {**rss, "note": "each worker holds every row it runs (torch: fp32 + bf16 models)"},
        "import_s": {"osx_runtime": import_seconds("import osx.runtime, onnxruntime"),
                     "torch_reference": import_seconds("import torch, osx.export.pipeline")},
        "install_mib": {"runtime_base": footprint(RUNTIME_DEPS)["total"], "torch_alone": footprint(["torch"])["total"]},
        "seconds": round(time.perf_counter() - t_start, 1),
        "workdir": str(work),
    }
    if args.markdown:
        args.markdown.write_text(markdown(result))
    return result


def markdown(r: dict) -> str:
    """The run as README tables: seconds per step with both ratios, the ablation, the gates, the targets."""
    sizes = list(r["sizes"])
    rows = list(r["sizes"][sizes[0]]["rows"])
    load = r["load_average"]
    out = [f"Load average (1/5/15 min) before the run {'/'.join(map(str, load['before']))}, after "
           f"{'/'.join(map(str, load['after']))}; {r['config']['threads_both_sides']} threads both sides.", "",
           "| seconds per step (speed-up vs torch fp32 / vs torch bf16) | " + " | ".join(f"{s} px" for s in sizes) + " |",
           "|---" * (len(sizes) + 1) + "|"]
    for row in [x for x in rows if x not in ABLATION]:
        gate = r["sizes"][sizes[0]]["rows"][row].get("quality_gate")
        cells = []
        for size in sizes:
            res = r["sizes"][size]
            cell = f"{res['rows'][row]['median_s']:.3f}"
            if row.startswith("osx"):
                cell += f" ({res['speedup'][f'{row} vs torch fp32']:.2f}x / {res['speedup'][f'{row} vs torch bf16']:.2f}x)"
            cells.append(cell)
        out.append(f"| {row}{f' (gate: {gate})' if gate else ''} | " + " | ".join(cells) + " |")
    outside = [f"{row} {', '.join(str(r['sizes'][s]['rows'][row]['outside_denoiser_us']) for s in sizes)}"
               for row in rows if "outside_denoiser_us" in r["sizes"][sizes[0]]["rows"][row]]
    out += ["", f"Outside the denoiser per step (median microseconds at {' / '.join(sizes)} px): {'; '.join(outside)}."]
    for size, res in r["sizes"].items():
        if "ablation_speedup_vs_before" in res:
            steps = "; ".join(f"{k}: {res['rows'][k]['median_s']:.3f} s ({v:.2f}x)" for k, v in res["ablation_speedup_vs_before"].items())
            out += ["", f"onnxruntime session changes one by one at {size} px: {steps} (`osx fp32` = + attention fused)."]
    for row, g in r["int8_gates"].items():
        video = g["video"] or {}
        out += ["", f"{row}: {g['quantizer']}; gate **{'passed' if g['passed'] else 'failed'}**"
                f"{' (' + '; '.join(g['failures']) + ')' if g['failures'] else ''}; worst per-step cosine "
                f"{g['denoiser_min_cosine']}, worst frame PSNR {video.get('psnr_min', float('nan')):.2f} dB; "
                f"{len(g['layers_kept_fp32'])} layer(s) kept in fp32{': ' + ', '.join(g['layers_kept_fp32']) if g['layers_kept_fp32'] else ''}, "
                f"{g['gate_attempts']} gate attempt(s)."]
    t = r["targets"]
    parts = []
    for name, v in t.items():
        if "per_size" in v:
            vals = ", ".join(f"{k} {x['precision']} {x['vs_torch_bf16']:.2f}x" if isinstance(x, dict) else f"{k} {100 * x:.3f} %"
                             for k, x in v["per_size"].items())
        elif "per_backend" in v:
            vals = ", ".join(f"{k} {x:.2f}x" for k, x in v["per_backend"].items())
        else:
            vals = f"{v['value']:.2f}x"
        parts.append(f"{name} (target {v['target']}): {vals} (**{'met' if v['met'] else 'not met'}**)")
    return "\n".join(out + ["", "Targets: " + "; ".join(parts) + "."]) + "\n"


def measure(workers: dict, rows: list[str], size: tuple[int, int, int], steps: int, warmup: int) -> dict:
    """Warm-up then `steps` rounds of one step per row, in turn; medians and ratios."""
    for row in rows:
        _worker(workers, row).call({"op": "prepare", "row": row, "size": size})
    times: dict[str, list[dict]] = {row: [] for row in rows}
    for k in range(warmup + steps):
        for row in rows:
            r = _worker(workers, row).call({"op": "step", "row": row, "size": size})
            if k >= warmup:
                times[row].append(r)
    out = {"rows": {}}
    for row, rs in times.items():
        entry = {"median_s": round(statistics.median(r["s"] for r in rs), 4), "steps_s": [round(r["s"], 4) for r in rs]}
        if "denoiser_s" in rs[0]:
            entry["outside_denoiser_share"] = round(statistics.median(1 - r["denoiser_s"] / r["s"] for r in rs), 5)
            entry["outside_denoiser_us"] = round(statistics.median(1e6 * (r["s"] - r["denoiser_s"]) for r in rs))
        out["rows"][row] = entry
    med = {row: e["median_s"] for row, e in out["rows"].items()}
    out["speedup"] = {f"{o} vs {t}": round(med[t] / med[o], 2)
                      for o in med if o.startswith("osx") for t in ("torch fp32", "torch bf16") if t in med}
    ablation = [r for r in ABLATION if r in med] + ["osx fp32"]
    if len(ablation) > 1:
        out["ablation_speedup_vs_before"] = {r: round(med[ablation[0]] / med[r], 2) for r in ablation}
    return out


def targets(results: dict, gates: dict) -> dict:
    fp32 = [row for row in FP32 if row in next(iter(results.values()))["rows"]]
    passing = fp32 + [row for row, gate in gates.items() if gate["passed"]]  # fp32 needs no gate: it is the export
    out = {}
    if "128x128" in results:  # each fp32 backend's ratio; the target is met by the faster one
        per = {row: results["128x128"]["speedup"][f"{row} vs torch fp32"] for row in fp32}
        out["osx fp32 vs torch fp32 at 128x128"] = {"per_backend": per, "value": max(per.values()),
                                                    "target": TARGET["fp32_vs_torch_fp32"], "met": max(per.values()) >= 1.5}
    best = {}
    for key, r in results.items():
        fastest = min(passing, key=lambda p: r["rows"][p]["median_s"])
        best[key] = {"precision": fastest, "vs_torch_bf16": r["speedup"][f"{fastest} vs torch bf16"]}
    out["fastest gate-passing osx vs torch bf16, every size"] = {
        "per_size": best, "target": TARGET["best_vs_torch_bf16"], "met": all(b["vs_torch_bf16"] >= 1.5 for b in best.values())}
    shares = {k: r["rows"]["osx fp32"]["outside_denoiser_share"] for k, r in results.items()}
    out["osx step outside the denoiser"] = {"per_size": shares, "target": TARGET["outside_denoiser_share"],
                                            "met": all(s < 0.01 for s in shares.values())}
    return out


def _worker(workers: dict, row: str) -> "Worker":
    return workers["torch" if row.startswith("torch") else "osx"]


class Worker:
    """A child process (this file with --worker) answering one JSON request per line."""

    def __init__(self, kind: str, config: dict, env: dict | None = None):
        cmd = [sys.executable, __file__, "--worker", kind, json.dumps(config)]
        self.kind = kind
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, **(env or {})}, cwd=Path(__file__).parent)

    def call(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], STEP_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"{self.kind} worker gave no answer to {request} (exit code {self.proc.returncode})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{self.kind} worker: {answer['error']}")
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- bundles --------------------------------------------------------------------------------------------


def prepare_bundle(model: str, out: Path, calibration: Path | None = None, search: bool = True,
                   method: str = "static") -> Path:
    """Export `model` with seeded random weights through the normal exporter, in a subprocess (this
    process never holds torch); with `calibration`, the denoiser at int8 (`method`: static or dynamic)
    through the quality gate (capturing the calibration set first). Reused if `out` holds a bundle."""
    if (out / "manifest.json").exists():
        return out
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from bench_runtime import int8_export, model_config
from osx import families, models
from osx.export.exporter import export_bundle
from osx.export.request import RANDOM_WEIGHTS, ExportRequest
cfg = model_config({model!r})
models.MODELS[cfg.name] = families.MODELS[cfg.name] = cfg  # the exporter looks configs up by name
calibration = {str(calibration) if calibration else None!r}
if calibration:
    int8_export(cfg, Path({str(out)!r}), Path(calibration), {search!r}, {method!r})
else:
    export_bundle(ExportRequest(cfg.name, {str(out)!r}, RANDOM_WEIGHTS, gpu="cpu", force=True, progress=lambda m: None))
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return out


def int8_export(cfg, out: Path, calib_dir: Path, search: bool, method: str = "static") -> None:
    """`osx calibrate` then `osx export --precision int8` (denoiser only) with a CPU profile; the gate's
    failure does not stop the benchmark (allow_quality_loss): its verdict is reported instead. `search`:
    the gate's layer search (slow: one quantization and video check per layer kept in fp32)."""
    import importlib.resources

    from osx.calibration.apply import QuantizeStep
    from osx.calibration.calibset import MANIFEST, CalibrationSet, weights_identity
    from osx.calibration.capture import adapter, capture, make_recipe
    from osx.calibration.prompts import CALIBRATION, HELDOUT, load_prompts
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest
    from osx.families import family_of

    if not (calib_dir / MANIFEST).exists():  # the family's reference run (osx calibrate's capture adapter)
        runs = adapter(family_of(cfg))
        recipe = make_recipe(cfg, weights_identity(cfg.random_init_seed, None), prompts=load_prompts(CALIBRATION),
                             heldout_prompts=load_prompts(HELDOUT), samples=8, heldout=2, steps_per_sample=4,
                             **runs.default_size(cfg), seed=0, shard_mb=64)
        capture(runs.build(cfg, None), calib_dir, recipe)
    CalibrationSet.open(calib_dir)
    profile = out.parent / "cpu-int8.toml"  # a custom profile, as a user would write one
    profile.write_text((importlib.resources.files("osx.profiles") / "cpu.toml").read_text().replace('name = "cpu"', 'name = "cpu-int8"')
                       .replace('denoiser = "fp32"', 'denoiser = "int8"'))
    export_bundle(ExportRequest(cfg.name, out, RANDOM_WEIGHTS, gpu=str(profile), force=True, progress=lambda m: None,
                                quantize=QuantizeStep(calib_dir, allow_quality_loss=True, search=search, int8_method=method)))


def gate_verdict(bundle: Path) -> dict:
    """The quality gate's verdict and figures for the int8 denoiser, from the bundle's report."""
    report = json.loads((bundle / "quantization" / "report.json").read_text())
    den = report["components"]["denoiser"]
    video = report.get("video") or {}
    return {"passed": report["passed"], "failures": report["failures"], "thresholds": report["thresholds"],
            "denoiser_min_cosine": round(den["gate"]["min_cosine"], 5),
            # None: no frame differed at all (PSNR infinite)
            "video": {k: video[k] for k in ("size", "psnr_min", "psnr_mean", "ssim_min", "flicker_ratio")} if video else None,
            "layers_kept_fp32": [e["layer"] for e in den["excluded"]],  # the quantizer's policy, then the search
            "gate_attempts": len(den["attempts"]),
            "quantizer": den["quantizer"], "quantized_ops": den["qdq"]["quantized_ops"]}


def backend_gate_verdict(bundle: Path, backend: str, calibration: Path, cache: Path) -> dict:
    """The quality gate's verdict for `backend` running the fp32 bundle (osx.calibration.backend_gate), in
    gate_verdict's form; kept in `cache` (computing it generates the held-out videos twice)."""
    if cache.exists():
        return json.loads(cache.read_text())
    from osx.calibration.backend_gate import gate_backend

    g = gate_backend(bundle, backend, calibration)
    m, video = g.metrics["components"]["denoiser"], g.metrics.get("video")
    verdict = {"passed": g.passed, "failures": g.failures, "thresholds": g.metrics["thresholds"],
               "denoiser_min_cosine": round(m["min_cosine"], 5), "denoiser_max_rel_l2": round(m["max_rel_l2"], 5),
               "video": {k: video[k] for k in ("size", "psnr_min", "psnr_mean", "ssim_min", "flicker_ratio")} if video else None,
               "layers_kept_fp32": [], "gate_attempts": 1,
               "quantizer": f"no quantization: --backend {backend} (OpenVINO bf16 denoiser, Sin/Cos phases fp32)"}
    cache.write_text(json.dumps(verdict, indent=1))
    return verdict


def ort_settings(threads: int) -> dict:
    from osx.runtime.backends import ORT_CONFIG, ORT_SESSION

    return {**ORT_SESSION, **ORT_CONFIG, "intra_op_num_threads": threads}


# --- the workers ----------------------------------------------------------------------------------------

BLOCKED = {"torch", "transformers", "diffusers", "onnx"}


class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not need it")


def serve(kind: str, config: dict) -> None:
    """Answer requests from stdin until it closes."""
    if kind == "osx":
        sys.meta_path.insert(0, _BlockTorch())
        side = OsxSide(config)
    elif model_config(config["model"]).family == "opensora-v2.0":
        from runtime_v2 import TorchSideV2

        side = TorchSideV2(model_config(config["model"]), config["threads"], PROMPT, SEED)
    else:
        side = TorchSide(config)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "rss":
                import resource

                answer = {"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
            else:
                answer = getattr(side, req["op"])(req["row"], tuple(req["size"]))
        except Exception as e:  # reported to the parent, which stops
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


class TorchSide:
    """The torch reference: one step of its sampler over STDiT3 in float32 or bfloat16."""

    def __init__(self, config: dict):
        import copy

        import torch

        from osx.export.reference import build_reference

        torch.set_num_threads(config["threads"])
        self.torch = torch
        self.cfg = model_config(config["model"])
        ref = build_reference(self.cfg)
        self.ref = ref
        self.models = {"torch fp32": ref.denoiser.eval(), "torch bf16": copy.deepcopy(ref.denoiser).to(torch.bfloat16).eval()}
        self.state = {}

    def prepare(self, row: str, size: tuple) -> dict:
        from osx.export.pipeline import _encode_text
        from osx.models import latent_frames, latent_size
        from osx.runtime.prompt import prepare_prompt
        from osx.runtime.scheduler import initial_noise
        from osx.runtime.tokenizer import TextTokenizer

        h, w, f = size
        cfg = self.cfg
        ids, mask = TextTokenizer(self.ref.tokenizer, cfg.text_encoder.max_length).encode(
            [prepare_prompt(PROMPT, cfg.scheduler.aesthetic_score)])
        with self.torch.no_grad():
            y = _encode_text(self.ref, ids, mask)
        shape = (1, cfg.vae.temporal.latent_embed_dim, latent_frames(f, cfg.vae), *latent_size(h, w, cfg.vae))
        self.state[row, size] = (self.torch.from_numpy(initial_noise(SEED, shape)), y, self.torch.from_numpy(mask))
        return {}

    def step(self, row: str, size: tuple) -> dict:
        from osx.export.sampler import sample

        h, w, f = size
        z, y, mask = self.state[row, size]
        model = self.models[row]
        t0 = time.perf_counter()
        sample(model, z, y, mask, model.null_text(1).float(), height=h, width=w, num_frames=f, fps=self.cfg.scheduler.fps,
               steps=1, guidance_scale=self.cfg.scheduler.guidance_scale, sched=self.cfg.scheduler)
        return {"s": time.perf_counter() - t0}


class OsxSide:
    """The runtime: `Pipeline.denoise` for one step, the bundle's session settings (or an ablation's)."""

    def __init__(self, config: dict):
        from osx.runtime.pipeline import Pipeline

        self.threads = config["threads"]
        self.pipes = {}
        for row, bundle in config["bundles"].items():
            self.pipes[row] = Pipeline.load(bundle, config.get("backends", {}).get(row))
        for row, (graph, arena, spinning) in ABLATION.items() if "no_attention_graph" in config else ():
            pipe = Pipeline.load(config["bundles"]["osx fp32"])
            pipe.backends["denoiser"] = ablation_backend(pipe.bundle, graph, arena, spinning, self.threads,
                                                         config.get("no_attention_graph"))
            self.pipes[row] = pipe
        for pipe in self.pipes.values():
            pipe.load_one_at_a_time = False
            for backend in pipe.backends.values():
                backend.threads = self.threads
        self.state = {}

    def prepare(self, row: str, size: tuple) -> dict:
        h, w, f = size
        pipe = self.pipes[row]
        request = pipe.prepare_request(PROMPT, height=h, width=w, num_frames=f, steps=1, seed=SEED)
        self.state[row, size] = (request, *pipe.encode_text(request))
        return {}

    def step(self, row: str, size: tuple) -> dict:
        pipe = self.pipes[row]
        pipe.denoise(*self.state[row, size])
        s = pipe.timings["steps"][0]
        return {"s": s["total_s"], "denoiser_s": s["denoiser_s"]}


def ablation_backend(bundle, graph: str, arena: bool, spinning: bool, threads: int, no_attention_graph: str | None = None):
    """The denoiser's OrtBackend with a session made from explicit settings (the runtime's otherwise)."""
    import onnxruntime as ort

    from osx.runtime.backends import OrtBackend, session_options

    backend = OrtBackend(bundle, "denoiser", threads=threads)
    if graph == "portable":
        backend.path = bundle.path(bundle.components["denoiser"].file)
    elif graph == "no-attention":
        backend.path = Path(no_attention_graph)
    options = session_options(threads)
    options.enable_cpu_mem_arena = arena
    options = _with_spinning(options, spinning)
    backend.session = ort.InferenceSession(str(backend.path), options, providers=["CPUExecutionProvider"])
    backend.output_names = [t.name for t in backend.spec.outputs]
    return backend


def _graph_without_attention_fusion(bundle: Path, folder: Path) -> Path:
    """The export's fusions of the bundle's denoiser except attention (osx.export.ort_optimize), in
    `folder` beside links to the portable graph and its data (a bundle holds only its manifest's files)."""
    from osx.bundle import Bundle
    from osx.export.ort_optimize import optimize_for_onnxruntime

    b = Bundle.open(bundle)
    portable = b.path(b.components["denoiser"].file)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in portable.parent.glob(portable.name + "*"):  # the graph and its external data, if any
        (folder / f.name).symlink_to(f.resolve())
    optimize_for_onnxruntime(folder / portable.name, folder / "denoiser.no-attention.onnx", attention=False)
    return folder / "denoiser.no-attention.onnx"


def _with_spinning(options, spinning: bool):
    """Session config entries cannot be overwritten, so a copy of `options` with the spinning entries set."""
    import onnxruntime as ort

    from osx.runtime.backends import ORT_CONFIG

    fresh = ort.SessionOptions()
    for attr in ("graph_optimization_level", "execution_mode", "inter_op_num_threads", "intra_op_num_threads",
                 "enable_mem_pattern", "enable_cpu_mem_arena", "log_severity_level"):
        setattr(fresh, attr, getattr(options, attr))
    for key in ORT_CONFIG:
        fresh.add_session_config_entry(key, "1" if spinning else "0")
    return fresh


# --- import time and install size -----------------------------------------------------------------------


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
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        serve(sys.argv[2], json.loads(sys.argv[3]))
    else:
        print(json.dumps(main(sys.argv[1:]), indent=2))
