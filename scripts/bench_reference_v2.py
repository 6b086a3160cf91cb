"""Open-Sora v2.0 torch reference on the CPU: `python scripts/bench.py reference_v2`.

Builds `opensora-v2.0-tiny` from seeded random weights (bf16, as Open-Sora runs) and times the whole reference
path (text encoders, 3-pass sampler over the config's steps, VAE encode of the reference for i2v, VAE decode)
for t2v and i2v_head at the tiny defaults (64x64 px, 9 frames) and at 96x96 px / 33 frames (the VAE tiles).
Median of --repeats runs, --threads torch threads (set OMP_WAIT_POLICY=PASSIVE on shared cores). Target from
issue 14: the whole tiny path "well under a minute".

With --load-blocks N (0: skip), also the memory of loading a real-width MMDiT checkpoint: N double + N single
blocks at the released width (3072, bf16) written as a safetensors file with random weights, then loaded strictly
in a fresh process into a module built on the meta device, every weight touched; peak RSS growth over the
file size (<= 1.0: the weights at most once; a bf16 file's tensors stay memory-mapped, so the kernel may keep
fewer of their pages resident).

Options: --repeats N  --threads N  --dtype bf16|fp32  --load-blocks N
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="bench.py reference_v2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--load-blocks", type=int, default=1)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from osx.export.pipeline_v2 import build_reference_v2, reference_generate_v2
    from osx.models_v2 import OPENSORA_V2_0_TINY as TINY

    torch.set_num_threads(args.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    start = time.perf_counter()
    model = build_reference_v2(TINY, dtype=dtype)
    build_s = time.perf_counter() - start
    image = (np.random.default_rng(0).random((120, 160, 3)) * 255).astype(np.uint8)
    cases = {
        "t2v_64px_9f": dict(),
        "i2v_head_64px_9f": dict(cond_type="i2v_head", references=[image]),
        "t2v_96px_33f": dict(resolution="96px", num_frames=33),
        "i2v_head_96px_33f": dict(resolution="96px", num_frames=33, cond_type="i2v_head", references=[image]),
    }
    seconds = {}
    for name, kw in cases.items():
        runs = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            reference_generate_v2(model, "a red fox walks through the snow at dawn", **kw)
            runs.append(time.perf_counter() - start)
        seconds[name] = round(statistics.median(runs), 3)
    load = load_memory(args.load_blocks) if args.load_blocks > 0 else None
    return {
        "model": TINY.name,
        "dtype": args.dtype,
        "threads": args.threads,
        "steps": TINY.sampler.num_steps,
        "build_s": round(build_s, 3),
        "generate_s_median": seconds,
        "target": "whole tiny reference path well under 60 s",
        "load_real_width_mmdit": load,
    }


LOAD_SCRIPT = """
import json, resource, sys, time, torch
from osx.export.checkpoint_v2 import load_part
from osx.export.mmdit import MMDiT
from osx.models_v2 import OPENSORA_V2_0
import dataclasses
cfg = dataclasses.replace(OPENSORA_V2_0.mmdit, depth=int(sys.argv[2]), depth_single_blocks=int(sys.argv[2]))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
with torch.device("meta"):
    m = MMDiT(cfg)
load_part(m, sys.argv[1], "mmdit", dtype=torch.bfloat16)
checksum = sum(float(p.float().sum()) for p in m.parameters())  # touch every weight: all of it resident
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"rss_growth_bytes": peak - base, "seconds": seconds}))
"""


def load_memory(blocks: int) -> dict:
    """Write a real-width MMDiT with `blocks` double + single blocks, load it in a fresh process, measure."""
    import dataclasses
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import torch

    from osx.export.checkpoint import write_safetensors_streamed
    from osx.export.mmdit import MMDiT
    from osx.models_v2 import OPENSORA_V2_0

    cfg = dataclasses.replace(OPENSORA_V2_0.mmdit, depth=blocks, depth_single_blocks=blocks)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), torch.bfloat16) for k, v in MMDiT(cfg).state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "Open_Sora_v2.safetensors"
        gen = torch.Generator().manual_seed(0)
        write_safetensors_streamed(path, shapes, lambda k: torch.randn(shapes[k][0], generator=gen).mul_(0.02).to(torch.bfloat16))
        size = path.stat().st_size
        out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(path), str(blocks)], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])
    return {
        "blocks": f"{blocks} double + {blocks} single at width {cfg.hidden_size}",
        "params": sum(int(torch.Size(s).numel()) for s, _ in shapes.values()),
        "file_gb": round(size / 1e9, 3),
        "load_s": round(measured["seconds"], 2),
        "peak_rss_growth_over_file": round(measured["rss_growth_bytes"] / size, 3),
        "target": "<= 1.0 (the weights at most once in memory; bf16 safetensors tensors stay file-backed pages)",
    }
