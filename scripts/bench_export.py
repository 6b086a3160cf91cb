"""Export benchmark: the whole model at real size, streamed, as ONE `osx export` command.

    python scripts/bench.py export --real-size                          # opensora-v1.2: T5 bf16, STDiT3 fp16, VAE
    python scripts/bench.py export --real-size --component denoiser     # a partial bundle: only these
    python scripts/bench.py export                                      # the same on the tiny model (a minute)
    python scripts/bench.py export --real-size --model opensora-v2.0 --component clip --component vae_decoder
    python scripts/bench.py export --real-size --model opensora-v2.0 --component denoiser --depth 1,1

Open-Sora v2.0: CLIP bf16, the MMDiT fp16 (the float graph of its FP8 plan), the VAE decoder and encoder
fp32; its T5 is v1.2's T5-XXL (same weights, 512 tokens instead of 300): v1.2's text_encoder row. The 11.9B
MMDiT (23.8 GB of bf16 weights) takes hours to write and export on two cores: `--depth D,S` exports it at
full width with D double-stream and S single-stream blocks (a model registered for the child process only;
the JSON says so and gives the full-depth weights beside the measured ones).

The child process is `osx export --random-weights --gpu cpu --dtype
text_encoder=bf16,denoiser=fp16,vae_decoder=fp32 --out DIR`: per component, seeded random weights are written to a scratch checkpoint in the released
layout (one tensor at a time), the graph is traced on the meta device and every weight streamed from that
checkpoint, the written initializers are checked (sha256) against it, and the component is validated
against PyTorch (at reduced depth when large); then the next component. Printed per component: params
and weights_bytes (the graph's initializers), wall_s (from the child's own log: the first line naming
the component to the next component's), cpu_s (the child's user + system time over the same span, from
/proc/PID/stat), peak_rss_bytes (the child's VmHWM, reset through
/proc/PID/clear_refs when a component starts and read when the next phase starts), onnx_bytes,
data_bytes and peak_rss_over_weights; and for the whole command the same sums, its wall_s, cpu_s (user +
system: wall time on shared cores says little) and peak_rss_bytes (the largest of the phases'), with the load
average before and after. Target (issue 13): peak RSS <= 4 GiB for every component.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_PEAK = 4 * 2**30
# The plan's types on a GPU (T5 bf16, STDiT3 fp16; the VAE is fp32: ONNX Conv has no bf16 before opset 22).
DTYPES_BY_FAMILY = {
    "opensora-v1.2": {"text_encoder": "bf16", "denoiser": "fp16", "vae_decoder": "fp32"},
    "opensora-v2.0": {"clip": "bf16", "denoiser": "fp16", "vae_decoder": "fp32", "vae_encoder": "fp32"},
}
REDUCED = "--reduced-depth"  # the child's first argument when the denoiser is cut in depth
LINE = re.compile(r"^\[\s*([0-9.]+)s\] (?:(\w+): )?")  # the exporter's progress lines: "[  12.3s] denoiser: ..."


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py export")
    p.add_argument("--real-size", action="store_true", help="opensora-v1.2 at real size (default model)")
    p.add_argument("--model", default=None, help="model config (default: opensora-v1.2 with --real-size, else the tiny one)")
    p.add_argument("--component", action="append", choices=sorted({c for d in DTYPES_BY_FAMILY.values() for c in d}),
                   help="components (default: the family's, see DTYPES_BY_FAMILY)")
    p.add_argument("--depth", default=None, help="opensora-v2.0's MMDiT at full width with D double and S single blocks: D,S")
    p.add_argument("--scratch", default=None, help="folder for the bundle (default: a temporary one; removed)")
    p.add_argument("--log", default=None, help="keep the child's log here (default: shown only on failure)")
    return p.parse_args(argv)


def main(argv: list[str]) -> dict:
    args = _parse(argv)
    model = args.model or ("opensora-v1.2" if args.real_size else "opensora-v1.2-tiny")
    dtypes = _dtypes(model)
    names = args.component or list(dtypes)
    depth = _depth(model, args.depth)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="osx-bench-export-", dir=args.scratch) as tmp:
        out = Path(tmp) / "bundle"
        whole, phases, log = _run(model, names, out, Path(args.log) if args.log else Path(tmp) / "export.log", depth)
        manifest = json.loads((out / "manifest.json").read_text())
        rows = [_component(out, name, manifest["components"][name], phases.get(name, {})) for name in names]
        shutil.rmtree(out, ignore_errors=True)
    total = {k: sum(r[k] for r in rows) for k in ("params", "weights_bytes", "onnx_bytes", "data_bytes")}
    total.update(whole, peak_rss_over_weights=round(whole["peak_rss_bytes"] / total["weights_bytes"], 3))
    reduced = {} if depth is None else {"reduced_depth": _reduced_report(model, depth)}
    return {"model": model, **reduced, "command": "osx export " + " ".join(_args(model, names, Path("OUT"))),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
            "target_peak_rss_bytes": TARGET_PEAK, "components": rows, "total": total,
            "meets_target": all(r["peak_rss_bytes"] <= TARGET_PEAK for r in rows) and whole["peak_rss_bytes"] <= TARGET_PEAK}


def _dtypes(model: str) -> dict[str, str]:
    from osx.families import get_model_config

    return DTYPES_BY_FAMILY[get_model_config(model).family]


def _args(model: str, names: list[str], out: Path) -> list[str]:
    dtypes = ",".join(f"{n}={_dtypes(model)[n]}" for n in names)
    extra = [f"--with-{n.replace('_', '-')}" for n in names if n == "vae_encoder"]  # not in the text-to-video plan
    return ["--model", model, "--random-weights", "--gpu", "cpu", "--dtype", dtypes, *extra,
            *(a for n in names for a in ("--component", n)), "--out", str(out)]


def _depth(model: str, text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    from osx.families import get_model_config

    cfg = get_model_config(model)
    try:
        d, s = (int(v) for v in text.split(","))
        assert cfg.family == "opensora-v2.0" and 1 <= d <= cfg.mmdit.depth and 1 <= s <= cfg.mmdit.depth_single_blocks
    except (ValueError, AssertionError, AttributeError):
        raise SystemExit(f"--depth {text!r}: D,S blocks of an opensora-v2.0 MMDiT (at most its "
                         f"{getattr(getattr(cfg, 'mmdit', None), 'depth', '?')},{getattr(getattr(cfg, 'mmdit', None), 'depth_single_blocks', '?')})") from None
    return d, s


def reduced_config(model: str, depth: tuple[int, int]):
    """`model`'s config with its MMDiT cut to `depth` (double, single) blocks, named so (the child registers it)."""
    import dataclasses

    from osx.families import get_model_config

    cfg = get_model_config(model)
    mmdit = dataclasses.replace(cfg.mmdit, depth=depth[0], depth_single_blocks=depth[1])
    return dataclasses.replace(cfg, name=f"{model}-depth{depth[0]}+{depth[1]}", mmdit=mmdit)


def _reduced_report(model: str, depth: tuple[int, int]) -> dict:
    from osx.families import get_model_config
    from osx.profiles.params_v2 import component_params_v2

    full, cut = get_model_config(model), reduced_config(model, depth)
    return {"note": "the MMDiT at full width with fewer blocks: a model registered for this benchmark's child "
                    "process only; the full depth's weights are given beside it",
            "double_blocks": [depth[0], full.mmdit.depth], "single_blocks": [depth[1], full.mmdit.depth_single_blocks],
            "params": component_params_v2(cut, "denoiser").total, "full_depth_params": component_params_v2(full, "denoiser").total}


def _run(model: str, names: list[str], out: Path, log_path: Path, depth: tuple[int, int] | None = None) -> tuple[dict, dict, Path]:
    """Run the export; returns the whole command's figures and {component: {wall_s, peak_rss_bytes}}."""
    args = _args(model, names, out)
    if depth is None:
        cmd = [sys.executable, "-m", "osx", "export", *args]
    else:
        args[args.index("--model") + 1] = reduced_config(model, depth).name
        cmd = [sys.executable, __file__, REDUCED, model, ",".join(map(str, depth)), *args]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    phases: dict[str, dict] = {}
    current, since, cpu = None, 0.0, 0.0
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
        for line in child.stdout:
            log.write(line)
            log.flush()
            m = LINE.match(line)
            if not m:
                continue
            phase = m.group(2) if m.group(2) in names else "bundle"
            if phase != current and phase not in phases:  # a new phase: close the last one, reset the peak
                now = _cpu(child.pid)
                if current is not None:
                    phases[current] = {"wall_s": round(float(m.group(1)) - since, 1), "cpu_s": round(now - cpu, 1),
                                       "peak_rss_bytes": _hwm(child.pid), "load_1m_at_end": round(os.getloadavg()[0], 2)}
                    print(json.dumps({current: phases[current]}), file=sys.stderr, flush=True)  # kept if the run is cut short
                _reset_hwm(child.pid)
                current, since, cpu = phase, float(m.group(1)), now
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"osx export failed:\n{log_path.read_text()[-4000:]}")
    # rusage's maxrss is the peak since the last reset (the closing phase): the command's is the largest of all
    peak = max([usage.ru_maxrss * 1024, *(p["peak_rss_bytes"] for p in phases.values())])
    whole = {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "peak_rss_bytes": peak}
    return whole, phases, log_path


def _hwm(pid: int) -> int:
    """The process's peak resident set (VmHWM) since the last reset, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")


def _cpu(pid: int) -> float:
    """The process's user + system CPU seconds so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)


def _component(out: Path, name: str, entry: dict, phase: dict) -> dict:
    params, weights = _initializers(out / entry["file"])
    onnx_bytes = (out / entry["file"]).stat().st_size
    data_bytes = (out / entry["data_file"]).stat().st_size if entry.get("data_file") else 0
    peak = phase.get("peak_rss_bytes", 0)
    v = entry["validation"]
    return {"component": name, "dtype": entry["precision"], "params": params, "weights_bytes": weights,
            "wall_s": phase.get("wall_s"), "cpu_s": phase.get("cpu_s"), "load_1m_at_end": phase.get("load_1m_at_end"),
            "peak_rss_bytes": peak, "onnx_bytes": onnx_bytes, "data_bytes": data_bytes,
            "peak_rss_over_weights": round(peak / weights, 3), "nodes": entry["nodes"],
            "weights_sha256_checked": entry["weights_check"]["from_checkpoint_sha256_ok"],
            "validation": {k: v.get(k) for k in ("graph", "depth", "tolerance", "structure") if v.get(k) is not None}
            | {"worst_rel": max(r["max_rel"] for r in v["rows"]), "passed": all(r["ok"] for r in v["rows"])}}


def _initializers(path: Path) -> tuple[int, int]:
    """Elements and bytes of the graph's initializers (what the export streamed), from the .onnx alone."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(path), load_external_data=False).graph
    numel = [(math.prod(t.dims), tensor_dtype_to_np_dtype(t.data_type).itemsize) for t in graph.initializer]
    return sum(n for n, _ in numel), sum(n * size for n, size in numel)


def _reduced_child(model: str, depth: str, args: list[str]) -> None:
    """`osx export ARGS` with `model`'s MMDiT cut in depth registered as a model of its family (this process only)."""
    from osx import families

    cfg = reduced_config(model, tuple(int(v) for v in depth.split(",")))
    families.MODELS[cfg.name] = families.get_family(cfg.family).configs[cfg.name] = cfg
    from osx.cli import main as osx

    osx(["export", *args])


if __name__ == "__main__":
    if sys.argv[1:2] == [REDUCED]:
        _reduced_child(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        print(json.dumps(main(sys.argv[1:]), indent=2))
