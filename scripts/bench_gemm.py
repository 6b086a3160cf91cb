"""One linear layer, int8 on onnxruntime vs torch fp32/bf16: `python scripts/bench.py gemm`.

Answers whether onnxruntime's int8 kernels here can beat torch bf16 (which runs on AMX tiles on CPUs
that have them) at the STDiT3's real GEMM shapes, before any model-level work: Y[M,N] = X[M,K] @ W[K,N]
with W constant, float32 in and out, as a denoiser's linear layers run.

Variants, each a one-MatMul ONNX graph quantized by onnxruntime's own tools (the graphs osx ships):
  * ort fp32: the MatMul itself;
  * ort dynamic u8s8 / s8 per-tensor: quantize_dynamic (DynamicQuantizeLinear + MatMulInteger, which
    onnxruntime fuses into DynamicQuantizeMatMul), weights int8 per output channel or per tensor;
  * ort qdq u8s8 / s8s8, per-channel / per-tensor: quantize_static (QDQ), activations uint8 asymmetric
    or int8 symmetric, calibrated on the input itself; onnxruntime fuses Q/DQ + MatMul into
    QLinearMatMul / MatMulIntegerToFloat;
  * torch fp32 / bf16: F.linear, OMP_WAIT_POLICY=PASSIVE set before torch is imported.
All in one process, the same intra-op threads, onnxruntime without spinning; the variants interleaved
(A B C ... A B C ...), median of --repeats calls each. GOPS = 2*M*K*N / seconds: int8 kernels beyond the
AVX512-VNNI peak (~2 x 64 int8 MACs per cycle per core) are AMX's; the fused op types actually run are
read off the optimized graph. `--torch-isa AVX512_CORE_BF16` caps oneDNN below AMX (a child process).

Shapes: M = tokens of one batch-2 denoiser call of the bench model (34 frames: 10 latent frames of
(H/16)x(W/16) patches; 320 / 1280 / 5120 at 64 / 128 / 256 px); K x N of its linear layers at width
384 (qkv, proj, mlp fc1, fc2) and of the real STDiT3 (width 1152) with --real-width.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: no busy-waiting threads

import numpy as np

SIZES = {"64x64": 320, "128x128": 1280, "256x256": 5120}
LAYERS = {"qkv": (1, 3), "proj": (1, 1), "fc1": (1, 4), "fc2": (4, 1)}  # (K, N) in units of the width
ORT_VARIANTS = ("ort fp32", "ort dynamic u8s8 per-channel", "ort dynamic u8s8 per-tensor",
                "ort qdq u8s8 per-channel", "ort qdq u8s8 per-tensor", "ort qdq s8s8 per-channel", "ort qdq s8s8 per-tensor")


def matmul_graph(path: Path, k: int, n: int, seed: int) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = (np.random.default_rng(seed).standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
        [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


class _Reader:
    def __init__(self, x):
        self.items = iter([{"x": x}])

    def get_next(self):
        return next(self.items, None)


def quantized_graph(name: str, src: Path, dst: Path, x: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    per_channel = "per-channel" in name
    if "dynamic" in name:
        quantize_dynamic(str(src), str(dst), per_channel=per_channel, weight_type=QuantType.QInt8)
        return
    signed = "s8s8" in name
    quantize_static(str(src), str(dst), _Reader(x), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=QuantType.QInt8 if signed else QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": signed, "WeightSymmetric": True})


def ort_session(path: Path, threads: int, optimized: Path):
    import onnxruntime as ort

    from osx.runtime.backends import session_options

    options = session_options(threads)
    options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def op_types(path: Path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(path)).graph.node})


def run_shape(m: int, k: int, n: int, threads: int, repeats: int, work: Path, torch_only: bool) -> dict:
    import torch

    x = np.random.default_rng(1).standard_normal((m, k), dtype=np.float32)
    calls, ops, errors = {}, {}, {}
    fp32 = work / f"fp32_{k}_{n}.onnx"
    matmul_graph(fp32, k, n, seed=k * 7 + n)
    w = torch.from_numpy(np.ascontiguousarray(_initializer(fp32).T))
    xt = torch.from_numpy(x)
    exact = x.astype(np.float64) @ w.numpy().T.astype(np.float64)
    if not torch_only:
        for name in ORT_VARIANTS:
            path = fp32 if name == "ort fp32" else work / f"{name.replace(' ', '_')}_{k}_{n}.onnx"
            if name != "ort fp32":
                quantized_graph(name, fp32, path, x)
            sess = ort_session(path, threads, work / f"opt_{path.name}")
            ops[name] = op_types(work / f"opt_{path.name}")
            calls[name] = (lambda s=sess: s.run(None, {"x": x})[0])
    wb, xb = w.to(torch.bfloat16), xt.to(torch.bfloat16)
    calls["torch fp32"] = lambda: torch.nn.functional.linear(xt, w).numpy()
    calls["torch bf16"] = lambda: torch.nn.functional.linear(xb, wb).float().numpy()
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for name, call in calls.items():  # warm-up, and each variant's error vs float64
            y = call()
            errors[name] = float(np.linalg.norm(y - exact) / np.linalg.norm(exact))
        for _ in range(repeats):
            for name, call in calls.items():
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
    out = {}
    for name, ts in times.items():
        s = statistics.median(ts)
        out[name] = {"ms": round(s * 1e3, 3), "gops": round(2 * m * k * n / s / 1e9, 1), "rel_err": round(errors[name], 5)}
        if name in ops:
            out[name]["ops"] = ops[name]
    bf16 = out["torch bf16"]["ms"]
    for row in out.values():
        row["vs_torch_bf16"] = round(bf16 / row["ms"], 2)
    return out


def _initializer(path: Path) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    return numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0])


def torch_isa_child(args, isa: str) -> dict:
    """The torch rows again in a child with oneDNN capped at `isa` (ONEDNN_MAX_CPU_ISA is read at load)."""
    import json

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA=isa, OMP_WAIT_POLICY="PASSIVE")
    argv = [sys.executable, __file__, "--torch-only", "--sizes", args.sizes, "--widths", args.widths,
            "--threads", str(args.threads), "--repeats", str(args.repeats)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)["shapes"]


def main(argv: list[str]) -> dict:
    from osx.runtime.backends import physical_cores

    p = argparse.ArgumentParser(prog="bench.py gemm")
    p.add_argument("--sizes", default="64x64,128x128,256x256")
    p.add_argument("--widths", default="384", help="comma-separated hidden widths (1152: the real STDiT3)")
    p.add_argument("--layers", default="qkv,fc2")
    p.add_argument("--threads", type=int, default=physical_cores())
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--torch-isa", default=None, help="also run the torch rows with oneDNN capped at this ISA")
    p.add_argument("--torch-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import onnxruntime
    import torch

    torch.set_num_threads(args.threads)
    shapes = {}
    with tempfile.TemporaryDirectory(prefix="bench-gemm-") as tmp:
        for size in args.sizes.split(","):
            for width in map(int, args.widths.split(",")):
                for layer in args.layers.split(","):
                    k, n = (f * width for f in LAYERS[layer])
                    key = f"{size} w{width} {layer} M={SIZES[size]} K={k} N={n}"
                    shapes[key] = run_shape(SIZES[size], k, n, args.threads, args.repeats, Path(tmp), args.torch_only)
    result = {"onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "threads": args.threads,
              "cpu_flags": _cpu_flags(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "load_before": os.getloadavg(), "shapes": shapes}
    if args.torch_isa and not args.torch_only:
        result[f"torch_onednn_max_isa_{args.torch_isa}"] = torch_isa_child(args, args.torch_isa)
    result["load_after"] = os.getloadavg()
    return result


def _cpu_flags() -> list[str]:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in flags if "amx" in f or "vnni" in f or f in ("avx512_bf16", "avx512f"))


if __name__ == "__main__":
    import json

    print(json.dumps(main(sys.argv[1:]), indent=2))
