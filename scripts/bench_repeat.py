"""Repeated vs fully traced graph at real width: is the copied graph (osx.export.repeat) the full trace's?

    python scripts/bench.py repeat                                   # opensora-v2.0's MMDiT, 4 double + 4 single blocks
    python scripts/bench.py repeat --model opensora-v1.2 --depth 5   # the STDiT3 at 5 of its 28 blocks

The denoiser at full width, cut to `--depth` blocks per kind (more than the 3 that repeat.py traces, so some
blocks are copies), gets seeded random weights in the released layout (a scratch safetensors file), and is
exported twice by the streamed path in `--dtype`: with its blocks traced 3 per kind and copied
(`repeat_for`, what `osx export` does) and traced whole. Printed: for each graph the export's seconds,
nodes and op counts, each initializer's name, dtype, shape and sha256 (compared: the checkpoint weights by
name, the exporter's own constants, numbered by trace order, by value), and the onnxruntime outputs of
both at the smallest shapes of the spec (max abs / max rel difference, relative to the output's largest
value; tolerance 1e-6 of scale: the same graph function). tests/test_repeat.py checks the same at tiny width.
One graph is on disk at a time (its outputs and hashes are kept), so the scratch is the checkpoint plus one graph.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

TOLERANCE = 1e-6  # of the output's largest value


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py repeat")
    p.add_argument("--model", default="opensora-v2.0")
    p.add_argument("--depth", default="4,4", help="denoiser blocks per declared kind (opensora-v2.0: double,single)")
    p.add_argument("--dtype", default="fp16", choices=("fp32", "fp16"), help="export dtype (onnxruntime runs both)")
    p.add_argument("--scratch", default=None, help="folder for the checkpoint and graphs (default: temporary; removed)")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_export import reduced_config

    from osx.export.exporter import _adapter, _weights, export_parts, repeat_for
    from osx.export.checkpoint import CheckpointReader
    from osx.export.init import write_random_part
    from osx.export.onnx_export import DTYPES
    from osx.export.repeat import TRACED
    from osx.families import component_specs, family_of, get_model_config

    args = _parse(argv)
    name, family = "denoiser", family_of(get_model_config(args.model))
    depth = tuple(int(v) for v in args.depth.split(","))
    if len(depth) != len(family.component(name).depth) or min(depth) <= TRACED:
        raise SystemExit(f"--depth {args.depth}: one count over {TRACED} for each of {', '.join(family.component(name).depth)}")
    cfg = reduced_config(args.model, depth)  # any depth: the tiny model's too, deepened
    load_before = os.getloadavg()
    part = family.component(name).weights
    spec = component_specs(cfg)[name]
    sizes = {d: r.min for d, r in spec.dims.items()}
    with tempfile.TemporaryDirectory(prefix="osx-bench-repeat-", dir=args.scratch) as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        glue = export_parts(family)
        ckpt = write_random_part(glue.part_factories(cfg)[part], tmp / "w.safetensors", DTYPES[args.dtype][1],
                                 cfg.random_init_seed, glue.random_init_std(cfg)[part])
        write_s = time.perf_counter() - start
        graphs = {}
        for kind, repeat in (("repeated", repeat_for(cfg, name)), ("full_trace", None)):
            folder = tmp / kind
            folder.mkdir()
            graphs[kind] = _export_and_run(_weights(cfg, name, CheckpointReader(ckpt)), spec, folder, args.dtype, repeat, sizes,
                                            _adapter(cfg))
            shutil.rmtree(folder)
    a, b = graphs["repeated"], graphs["full_trace"]
    weights = [n for n in b["initializers"] if n.startswith("module.")]
    diff = _difference(a.pop("outputs"), b.pop("outputs"))
    same = {
        "nodes": a["nodes"] == b["nodes"], "op_counts": a["op_counts"] == b["op_counts"],
        "checkpoint_weights_by_name": {n: a["initializers"].get(n) for n in weights} == {n: b["initializers"][n] for n in weights},
        "all_initializers_by_value": Counter(a["initializers"].values()) == Counter(b["initializers"].values()),
        "weights_sha256_checked": a["weights_check"] == b["weights_check"],
        "outputs_within_tolerance": all(d["max_rel"] <= TOLERANCE for d in diff.values()),
    }
    for g in (a, b):
        g["initializers"] = len(g["initializers"])
    return {"model": cfg.name, "component": name, "dtype": args.dtype, "blocks": dict(zip(family.component(name).depth, depth)),
            "run_sizes": sizes, "random_weights_write_s": round(write_s, 1), "graphs": graphs, "output_difference": diff,
            "tolerance_rel": TOLERANCE, "same": same, "identical": all(same.values()),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count()}


def _export_and_run(weights, spec, folder: Path, dtype: str, repeat, sizes: dict, adapter) -> dict:
    import onnx
    import onnxruntime as ort

    from osx.export.onnx_export import DTYPES, export_streamed, torch_inputs
    from osx.export.stream import stored_bytes

    start = time.perf_counter()
    info = export_streamed(weights, spec, folder / "g.onnx", dtype=dtype, repeat=repeat, adapter=adapter)
    seconds = time.perf_counter() - start
    model = onnx.load(str(folder / "g.onnx"), load_external_data=False)
    inits = {t.name: (t.data_type, tuple(t.dims), hashlib.sha256(stored_bytes(t, folder)).hexdigest())
             for t in model.graph.initializer}
    del model
    feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, torch_inputs(spec.with_precision(DTYPES[dtype][0]), sizes, seed=1))}
    start = time.perf_counter()
    session = ort.InferenceSession(str(folder / "g.onnx"), providers=["CPUExecutionProvider"])
    outputs = session.run(None, feeds)
    run_s = time.perf_counter() - start
    del session
    return {"export_s": round(seconds, 1), "onnxruntime_load_and_run_s": round(run_s, 1), "nodes": info.nodes,
            "op_counts": info.op_counts, "weights_check": info.weights_check, "initializers": inits,
            "outputs": [o.astype(np.float64) for o in outputs]}


def _difference(got: list, want: list) -> dict:
    out = {}
    for i, (g, w) in enumerate(zip(got, want)):
        scale = float(np.abs(w).max())
        err = float(np.abs(g - w).max())
        out[f"output{i}"] = {"max_abs": err, "max_rel": err / scale if scale else err, "scale": scale,
                             "bit_identical": bool(np.array_equal(g, w))}
    return out
