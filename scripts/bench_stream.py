"""Streamed vs in-memory export of one component, side by side: issue 13's wall-time target as a ratio.

    python scripts/bench.py stream --component denoiser --depth 2     # real-width STDiT3, first 2 of 28 blocks
    python scripts/bench.py stream --model opensora-v1.2-tiny         # seconds

Both sides export the same component (`--depth` N: its first N blocks at full width, as validation
cuts it) from the same seeded random checkpoint (written once, in the export dtype) in a child process
each: `streamed` traces on the meta device and writes every weight from the checkpoint, then checks them
(sha256), as `osx export` does; `in_memory` builds the module with its weights read from the same
checkpoint and exports it (`export_component`). The rounds alternate (A B B A ...) so both sides share
the machine's load. Printed per side: each round's wall_s, cpu_s (user + system) and peak_rss_bytes
(wait4), their medians, and streamed / in_memory ratios. A ratio <= 1 is "no worse than the in-memory
export"; on shared cores compare the cpu_s ratio, wall time waits on the others.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys
from osx.export.checkpoint import CheckpointReader
from osx.export.onnx_export import DTYPES, export_component, export_streamed
from osx.export.stream import Weights
sys.path.insert(0, sys.argv[6])
from bench_stream import cut_config

mode, model, component, depth, ckpt, _, out, dtype = sys.argv[1:]
cfg, part, spec, factory = cut_config(model, component, int(depth))
weights = Weights(factory, CheckpointReader(ckpt), unused_ok=True)
if mode == "streamed":
    export_streamed(weights, spec, out, dtype=dtype)
else:
    export_component(weights.materialize(DTYPES[dtype][1]), spec, out, dtype=dtype)
"""


def cut_config(model: str, component: str, depth: int):
    """(config with the component's first `depth` blocks, its checkpoint part, spec, module factory)."""
    import dataclasses

    from osx.export.exporter import DEPTH, _part
    from osx.export.reference import part_factories
    from osx.families import component_specs, get_model_config

    cfg = get_model_config(model)
    if depth and component in DEPTH:
        section, field = DEPTH[component]
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: depth})})
    part = _part(cfg, component)
    return cfg, part, component_specs(cfg)[component], part_factories(cfg)[part]


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py stream")
    p.add_argument("--model", default="opensora-v1.2")
    p.add_argument("--component", default="denoiser")
    p.add_argument("--depth", type=int, default=2, help="first N blocks (0: the whole component)")
    p.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--rounds", type=int, default=2, help="runs per side (alternating)")
    p.add_argument("--scratch", default=None)
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    from osx.export.onnx_export import DTYPES
    from osx.export.reference import write_random_checkpoint

    args = _parse(argv)
    cfg, part, _, _ = cut_config(args.model, args.component, args.depth)
    runs: dict[str, list[dict]] = {"streamed": [], "in_memory": []}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="osx-bench-stream-", dir=args.scratch) as tmp:
        ckpt = write_random_checkpoint(cfg, part, Path(tmp) / f"{part}.safetensors", DTYPES[args.dtype][1])
        order = [("streamed", "in_memory")[(i + i // 2) % 2] for i in range(2 * args.rounds)]  # A B B A A B ...
        for i, mode in enumerate(order):
            out = Path(tmp) / f"{mode}-{i}"
            out.mkdir()
            runs[mode].append(_child(mode, args, ckpt, out / f"{args.component}.onnx"))
            print(json.dumps({mode: runs[mode][-1]}), file=sys.stderr, flush=True)
            for f in out.iterdir():
                f.unlink()
    med = {m: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s", "peak_rss_bytes")} for m, rs in runs.items()}
    return {"model": args.model, "component": args.component, "depth": args.depth or "full", "dtype": args.dtype,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "runs": runs, "median": med,
            "streamed_over_in_memory": {k: round(med["streamed"][k] / med["in_memory"][k], 3) for k in med["streamed"]}}


def _child(mode: str, args, ckpt: Path, out: Path) -> dict:
    cmd = [sys.executable, "-c", CHILD, mode, args.model, args.component, str(args.depth), str(ckpt),
           str(Path(__file__).parent), str(out), args.dtype]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    log = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} export failed:\n{log[-4000:]}")
    return {"wall_s": round(time.perf_counter() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:]), indent=2))
