"""Export benchmark: each component at real size, streamed, one `osx export` process per component.

    python scripts/bench.py export --real-size                          # opensora-v1.2: T5 bf16, STDiT3 fp16, VAE
    python scripts/bench.py export --real-size --component denoiser     # one of them
    python scripts/bench.py export --model opensora-v1.2-tiny           # the same on the tiny model (seconds)

Each component runs `osx export --random-weights --component NAME --gpu cpu --dtype D` in a child
process: the seeded random weights are written to a scratch checkpoint in the released layout (one tensor
at a time), the graph is traced on the meta device and every weight streamed from that checkpoint, the
written initializers are checked (sha256) against it, and the component is validated against PyTorch
(at reduced depth when large). Printed per component: params and weights_bytes (the graph's
initializers), wall_s, cpu_s (user + system: wall time on shared cores says little), peak_rss_bytes
(the child alone, from wait4's rusage), onnx_bytes, data_bytes and
peak_rss_over_weights. Target (issue 13): peak RSS <= 4 GiB for every component.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PEAK = 4 * 2**30
DTYPES = {"text_encoder": "bf16", "denoiser": "fp16", "vae_decoder": "fp32"}  # the plan's types (VAE: no bf16 Conv)


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py export")
    p.add_argument("--real-size", action="store_true", help="opensora-v1.2 at real size (default model)")
    p.add_argument("--model", default=None, help="model config (default: opensora-v1.2 with --real-size, else the tiny one)")
    p.add_argument("--component", action="append", choices=list(DTYPES), help="components (default: all three)")
    p.add_argument("--scratch", default=None, help="folder for the bundles (default: a temporary one; removed)")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    model = args.model or ("opensora-v1.2" if args.real_size else "opensora-v1.2-tiny")
    results = []
    with tempfile.TemporaryDirectory(prefix="osx-bench-export-", dir=args.scratch) as tmp:
        for name in args.component or list(DTYPES):
            results.append(_run(model, name, DTYPES[name], Path(tmp) / name))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
            shutil.rmtree(Path(tmp) / name, ignore_errors=True)
    return {"model": model, "target_peak_rss_bytes": TARGET_PEAK, "components": results,
            "meets_target": all(r["peak_rss_bytes"] <= TARGET_PEAK for r in results)}


def _run(model: str, name: str, dtype: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "osx", "export", "--model", model, "--random-weights", "--gpu", "cpu",
           "--dtype", dtype, "--component", name, "--out", str(out)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    start = time.perf_counter()
    with open(out.parent / f"{name}.log", "w+") as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            log.seek(0)
            raise SystemExit(f"osx export --component {name} failed:\n{log.read()[-4000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    entry = manifest["components"][name]
    params, weights = _initializers(out / entry["file"])
    onnx_bytes = (out / entry["file"]).stat().st_size
    data_bytes = (out / entry["data_file"]).stat().st_size if entry.get("data_file") else 0
    peak = usage.ru_maxrss * 1024
    v = entry["validation"]
    return {"component": name, "dtype": entry["precision"], "params": params, "weights_bytes": weights,
            "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": peak, "onnx_bytes": onnx_bytes, "data_bytes": data_bytes,
            "peak_rss_over_weights": round(peak / weights, 3), "nodes": entry["nodes"],
            "weights_sha256_checked": entry["weights_check"]["from_checkpoint_sha256_ok"],
            "validation": {"graph": v.get("graph"), "depth": v.get("depth"), "tolerance": v["tolerance"],
                           "worst_rel": max(r["max_rel"] for r in v["rows"]), "passed": all(r["ok"] for r in v["rows"])}}


def _initializers(path: Path) -> tuple[int, int]:
    """Elements and bytes of the graph's initializers (what the export streamed), from the .onnx alone."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    numel = [(math.prod(t.dims), tensor_dtype_to_np_dtype(t.data_type).itemsize) for t in graph.initializer]
    return sum(n for n, _ in numel), sum(n * size for n, size in numel)


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
