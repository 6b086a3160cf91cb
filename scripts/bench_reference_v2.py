"""Open-Sora v2.0 torch reference on the CPU: `python scripts/bench.py reference_v2`.

Builds `opensora-v2.0-tiny` from seeded random weights (bf16, as Open-Sora runs) and times the whole reference
path (text encoders, 3-pass sampler over the config's steps, VAE encode of the reference for i2v, VAE decode)
for t2v and i2v_head at the tiny defaults (64x64 px, 9 frames) and at 96x96 px / 33 frames (the VAE tiles).
Median of --repeats runs, --threads torch threads (set OMP_WAIT_POLICY=PASSIVE on shared cores). Target from
issue 14: the whole tiny path "well under a minute".

Options: --repeats N  --threads N  --dtype bf16|fp32
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
    return {
        "model": TINY.name,
        "dtype": args.dtype,
        "threads": args.threads,
        "steps": TINY.sampler.num_steps,
        "build_s": round(build_s, 3),
        "generate_s_median": seconds,
        "target": "whole tiny reference path well under 60 s",
    }
