"""INT8 (and FP8, where ModelOpt is installed) vs fp32 on onnxruntime CPU: `python scripts/bench.py quant`.

For each config (the tiny model, and a "small" one: the tiny architecture at 6x the denoiser width and
2x the depth, 8x the text encoder width, 128x128 px), with seeded random weights: capture calibration
activations from the torch reference, export the text encoder and denoiser, quantize them, then report

  * denoiser step time (one batch-2 cond+uncond call at the capture size; median of --repeats runs,
    onnxruntime CPU with the runtime's session settings), fp32 vs quantized, and the speed-up;
  * the quality gate's component figures on the held-out prompts (worst per-step cosine and relative
    L2 of the denoiser output, worst per-prompt cosine of the text embeddings) with everything
    quantized, and after the sensitivity search (INT8; FP8 with --fp8-search): the layers it kept in
    full precision and the figures then. The end-to-end video part of the gate needs a bundle:
    `osx export --precision int8 --calibration DIR` reports it.

Options: --configs tiny,small  --samples N  --heldout N  --repeats N  --fp8/--no-fp8  --fp8-search  --threads N
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def configs():
    from osx.models import OPENSORA_V1_2_TINY as TINY

    small = dataclasses.replace(
        TINY, name="opensora-v1.2-small",
        text_encoder=dataclasses.replace(TINY.text_encoder, d_model=256, d_kv=32, d_ff=512, num_layers=4, num_heads=8),
        denoiser=dataclasses.replace(TINY.denoiser, hidden_size=384, depth=4, num_heads=6, caption_channels=256),
        defaults=dataclasses.replace(TINY.defaults, height=128, width=128, num_frames=34),
    )
    return {"tiny": TINY, "small": small}


def session(path: Path, threads: int | None):
    import onnxruntime as ort

    from osx.runtime.backends import session_options

    return ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def step_seconds(path: Path, sample: dict, repeats: int, threads: int | None) -> float:
    sess = session(path, threads)
    feed = {i.name: sample[i.name] for i in sess.get_inputs()}
    sess.run(None, feed)  # warm-up: first-run allocations and kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fused_fp32(path: Path) -> Path:
    from osx.export.ort_optimize import SUFFIX, optimize_for_onnxruntime

    fused = path.with_name(path.name.removesuffix(".onnx") + SUFFIX)
    optimize_for_onnxruntime(path, fused)
    return fused


def bench_config(name: str, cfg, args, work: Path) -> dict:
    from osx.calibration import apply, gate, quantize
    from osx.calibration.capture import capture, make_recipe
    from osx.calibration.prompts import CALIBRATION, HELDOUT, load_prompts
    from osx.calibration.shards import ShardReader
    from osx.families import component_specs
    from osx.export.onnx_export import export_component
    from osx.export.reference import build_reference

    d = cfg.defaults
    t0 = time.perf_counter()
    reference = build_reference(cfg, seed=0)
    recipe = make_recipe(cfg, "random:seed=0", prompts=load_prompts(CALIBRATION), heldout_prompts=load_prompts(HELDOUT),
                         samples=args.samples, heldout=args.heldout, steps_per_sample=4, height=d.height, width=d.width,
                         num_frames=d.num_frames, seed=0, shard_mb=64)
    calib = capture(reference, work / "calib", recipe)
    capture_s = time.perf_counter() - t0
    specs = component_specs(cfg)
    fp32 = {}
    for comp, module in (("text_encoder", reference.text_encoder), ("denoiser", reference.denoiser)):
        fp32[comp] = work / f"{comp}.onnx"
        export_component(module, specs[comp], fp32[comp])

    sample = next(iter(ShardReader(calib.shards("heldout", "denoiser"))))
    out = {
        "denoiser": {"hidden_size": cfg.denoiser.hidden_size, "depth": cfg.denoiser.depth},
        "size": {"height": d.height, "width": d.width, "num_frames": d.num_frames, "latent": list(sample["x"].shape)},
        "calibration": {"samples": calib.count("calibration", "denoiser"), "heldout_samples": calib.count("heldout", "denoiser"),
                        "capture_s": round(capture_s, 1)},
        # as the runtime runs them: fp32 and onnxruntime's INT8 fused at export (osx.export.ort_optimize)
        "fp32_step_s": step_seconds(fused_fp32(fp32["denoiser"]), sample, args.repeats, args.threads),
    }
    precisions = ["int8"] + (["fp8"] if args.fp8 and quantize.modelopt_available() is None else [])
    if args.fp8 and "fp8" not in precisions:
        out["fp8_skipped"] = quantize.modelopt_available()
    for precision in precisions:
        res = {}
        for comp in ("text_encoder", "denoiser"):
            t0 = time.perf_counter()
            search = precision == "int8" or args.fp8_search  # FP8 probes run ModelOpt once per layer: slow
            g, entry = apply.quantize_component(comp, fp32[comp], work / f"{comp}.{precision}.onnx", precision, calib,
                                                gate.Thresholds(), search=search)
            first = entry["attempts"][0]
            res[comp] = {"seconds": round(time.perf_counter() - t0, 1), "quantized_ops": entry["qdq"]["quantized_ops"],
                         "all_quantized": {"min_cosine": round(first["min_cosine"], 5), "max_rel_l2": round(first["max_rel_l2"], 4),
                                           "passes": first["passed"]},
                         "excluded_layers": [e["layer"] for e in entry["excluded"]],
                         "final": {"min_cosine": round(entry["gate"]["min_cosine"], 5),
                                   "max_rel_l2": round(entry["gate"]["max_rel_l2"], 4), "passes": g.passed},
                         "searched": search}
            if comp == "denoiser":
                res[comp]["per_step"] = [{k: round(v, 5) for k, v in r.items()} for r in entry["gate"]["per_step"]]
                runs = entry["onnxruntime_graph"]["file"] if "onnxruntime_graph" in entry else f"{comp}.{precision}.onnx"
                res[comp]["step_s"] = step_seconds(work / runs, sample, args.repeats, args.threads)
                res[comp]["speedup_vs_fp32"] = round(out["fp32_step_s"] / res[comp]["step_s"], 2)
        out[precision] = res
    return out


def main(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog="bench.py quant")
    p.add_argument("--configs", default="tiny,small")
    p.add_argument("--samples", type=int, default=8, help="calibration prompts")
    p.add_argument("--heldout", type=int, default=2, help="held-out prompts")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (default: the runtime's, one per physical core)")
    p.add_argument("--fp8", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--fp8-search", action="store_true", help="run the sensitivity search for FP8 too (slow)")
    args = p.parse_args(argv)
    import onnxruntime

    result = {"onnxruntime": onnxruntime.__version__, "device": "CPU", "configs": {}}
    all_configs = configs()
    for name in args.configs.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-quant-{name}-") as tmp:
            result["configs"][name] = bench_config(name, all_configs[name], args, Path(tmp))
    return result


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(main(sys.argv[1:]), indent=2))
