"""Export benchmark: the whole model at real size, streamed, as ONE `osx export` command.

    python scripts/bench.py export --real-size                          # opensora-v1.2: T5 bf16, STDiT3 fp16, VAE
    python scripts/bench.py export --real-size --component denoiser     # a partial bundle: only these
    python scripts/bench.py export                                      # the same on the tiny model (a minute)
    python scripts/bench.py export --real-size --model opensora-v2.0                     # every v2.0 component
    python scripts/bench.py export --real-size --model opensora-v2.0 --component denoiser --depth 4,4

Open-Sora v2.0: CLIP bf16, the MMDiT fp16 (the float graph of its FP8 plan), the VAE decoder and encoder
fp32; its T5 is v1.2's T5-XXL (same weights, 512 tokens instead of 300): v1.2's text_encoder row. The 11.9B
MMDiT at full depth (19 + 38 blocks; 23.8 GB of fp16 weights, written twice: the scratch checkpoint, then
the graph's data, so about 48 GB of scratch disk) measured 794.5 s wall / 354.3 s CPU and a peak RSS of
3,995,152,384 bytes (3.72 GiB); the whole v2.0 export 1020.7 s wall / 481.3 s CPU (README, Open-Sora v2.0,
"Real size": 2 shared cores, load average 5.72 -> 7.12). `--depth D,S` exports it at full width with D
double-stream and S single-stream blocks (a model registered for the child process only; the JSON says so
and gives the full-depth weights beside the measured ones): a quick check before the full run.

The child process is `osx export --random-weights --gpu cpu --dtype
text_encoder=bf16,denoiser=fp16,vae_decoder=fp32 --out DIR`: per component, seeded random weights are written
to a scratch checkpoint in the released layout (one tensor at a time); then, in a process of the component's
own (osx.export.component_process; its memory goes back to the OS when it ends), the graph is traced on the
meta device and every weight streamed from that checkpoint, the written initializers are checked (sha256)
against it, and the component is validated against PyTorch (at reduced depth when large); then the next
component. Printed per component: params and weights_bytes (the graph's initializers), wall_s (from the
export's own log: the first line naming the component to the next component's), cpu_s (user + system time
of the export process and the component's process over the same span, /proc/PID/stat), peak_rss_bytes: the
most the component needed at once, i.e. its own process's peak (getrusage in that process, recorded in the
manifest's export.process_peak_rss_bytes) plus what the export process held meanwhile (VmRSS when it started
waiting), or the export process's own peak in the phase if larger (VmHWM, reset through /proc/PID/clear_refs
when the phase starts); onnx_bytes, data_bytes and peak_rss_over_weights. For the whole command: the same
sums, its wall_s, cpu_s (every process; wall time on shared cores says little) and peak_rss_bytes (the
largest phase's), with the load average before and after. Target (issue 13): peak RSS <= 4 GiB for every
component.
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
OWN_PROCESS = "in a process of its own"  # the exporter's line when a component's own process starts
LINE = re.compile(r"^\[\s*([0-9.]+)s\] (?:(\w+): )?")  # the exporter's progress lines: "[  12.3s] denoiser: ..."


def _parse(argv):
    p = argparse.ArgumentParser(prog="bench.py export")
    p.add_argument("--real-size", action="store_true", help="opensora-v1.2 at real size (default model)")
    p.add_argument("--model", default=None, help="model config (default: opensora-v1.2 with --real-size, else the tiny one)")
    p.add_argument("--component", action="append", choices=sorted({c for d in DTYPES_BY_FAMILY.values() for c in d}),
                   help="components (default: the family's, see DTYPES_BY_FAMILY)")
    p.add_argument("--depth", default=None, help="the denoiser at full width with fewer blocks: N (opensora-v1.2's "
                   "STDiT3), D,S (opensora-v2.0's MMDiT: double, single)")
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
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="osx-bench-export-", dir=args.scratch) as tmp:
        out = Path(tmp) / "bundle"
        whole, phases, log = _run(model, names, out, Path(args.log) if args.log else Path(tmp) / "export.log", depth)
        manifest = json.loads((out / "manifest.json").read_text())
        own = manifest["export"].get("process_peak_rss_bytes", {})  # the components' own processes (getrusage)
        for name, phase in phases.items():
            phase["peak_rss_bytes"] = _peak(phase, own.get(name))
            if name in own:
                phase["own_process_peak_rss_bytes"] = own[name]
        rows = [_component(out, name, manifest["components"][name], phases.get(name, {})) for name in names]
        shutil.rmtree(out, ignore_errors=True)
    total = {k: sum(r[k] for r in rows) for k in ("params", "weights_bytes", "onnx_bytes", "data_bytes")}
    whole["peak_rss_bytes"] = max(p["peak_rss_bytes"] for p in phases.values())
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


def _depth(model: str, text: str | None) -> tuple[int, ...] | None:
    """--depth: one block count per block kind the family declares for its denoiser (ComponentDecl.depth)."""
    if text is None:
        return None
    from osx.families import family_of, get_model_config

    cfg = get_model_config(model)
    fields = family_of(cfg).component("denoiser").depth
    full = [getattr(getattr(cfg, f.split(".")[0]), f.split(".")[1]) for f in fields]
    try:
        depth = tuple(int(v) for v in text.split(","))
        assert len(depth) == len(fields) and all(1 <= d <= n for d, n in zip(depth, full))
    except (ValueError, AssertionError):
        raise SystemExit(f"--depth {text!r}: {model}'s denoiser blocks, one count for each of "
                         f"{', '.join(fields)} (at most {','.join(map(str, full))})") from None
    return depth


def reduced_config(model: str, depth: tuple[int, ...]):
    """`model`'s config with its denoiser cut to `depth` blocks (per declared block count), named so (the
    child registers it)."""
    import dataclasses

    from osx.families import family_of, get_model_config

    cfg = get_model_config(model)
    for path, n in zip(family_of(cfg).component("denoiser").depth, depth):
        section, field = path.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: n})})
    return dataclasses.replace(cfg, name=f"{model}-depth{'+'.join(map(str, depth))}")


def _denoiser_params(cfg) -> int:
    if cfg.family == "opensora-v2.0":
        from osx.profiles.params_v2 import component_params_v2

        return component_params_v2(cfg, "denoiser").total
    from osx.profiles.params import denoiser_params

    return denoiser_params(cfg).total


def _reduced_report(model: str, depth: tuple[int, ...]) -> dict:
    from osx.families import family_of, get_model_config

    full, cut = get_model_config(model), reduced_config(model, depth)
    fields = family_of(full).component("denoiser").depth
    blocks = {f: [getattr(getattr(cut, f.split(".")[0]), f.split(".")[1]), getattr(getattr(full, f.split(".")[0]), f.split(".")[1])]
              for f in fields}
    return {"note": "the denoiser at full width with fewer blocks: a model registered for this benchmark's child "
                    "process only; the full depth's parameters are given beside it",
            "blocks": blocks, "params": _denoiser_params(cut), "full_depth_params": _denoiser_params(full)}


def _run(model: str, names: list[str], out: Path, log_path: Path, depth: tuple[int, ...] | None = None) -> tuple[dict, dict, Path]:
    """Run the export; returns the whole command's figures and {phase: {wall_s, cpu_s, export_process_peak_rss_bytes,
    export_process_rss_bytes_meanwhile (while the component's own process ran), ...}}."""
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
            last = float(m.group(1))
            phase = m.group(2) if m.group(2) in names else "bundle"
            if phase != current and phase not in phases:  # a new phase: close the last one, reset the peak
                now = _cpu(child.pid)
                if current is not None:
                    phases[current].update(wall_s=round(float(m.group(1)) - since, 1), cpu_s=round(now - cpu, 1),
                                           load_1m_at_end=round(os.getloadavg()[0], 2))
                    print(json.dumps({current: phases[current]}), file=sys.stderr, flush=True)  # kept if the run is cut short
                _reset_hwm(child.pid)
                current, since, cpu = phase, float(m.group(1)), now
                phases[current] = {}
            # the export process's own peak in this phase, read on each of its lines (the last one ends the command)
            hwm = _status(child.pid, "VmHWM")
            if hwm is not None:  # None: it has just exited
                phases[current]["export_process_peak_rss_bytes"] = hwm
            if OWN_PROCESS in line:  # it now waits for the component's process, holding what it holds now
                phases[current]["export_process_rss_bytes_meanwhile"] = _status(child.pid, "VmRSS")
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"osx export failed:\n{log_path.read_text()[-4000:]}")
    phases[current].update(wall_s=round(last - since, 1))
    # user + system time of the command and every process it waited for (the components' own processes)
    whole = {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
             "largest_single_process_peak_rss_bytes": usage.ru_maxrss * 1024}
    return whole, phases, log_path


def _status(pid: int, field: str) -> int | None:
    """A /proc/PID/status size (VmHWM: peak resident set since the last reset; VmRSS: now), in bytes; None
    once the process has exited (a zombie's status has no sizes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return None


def _cpu(pid: int) -> float:
    """User + system CPU seconds so far of the process and the children it waited for (/proc/PID/stat 14-17)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _peak(phase: dict, own: int | None) -> int:
    """A phase's peak resident set: the export process's own, or, where the component ran in a process of its
    own, that process's peak plus what the export process held meanwhile (it only waits then), if larger."""
    alone = phase.get("export_process_peak_rss_bytes", 0)
    return alone if own is None else max(alone, phase.get("export_process_rss_bytes_meanwhile", 0) + own)


def _reset_hwm(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)


def _component(out: Path, name: str, entry: dict, phase: dict) -> dict:
    params, weights = _initializers(out / entry["file"])
    onnx_bytes = (out / entry["file"]).stat().st_size
    data_bytes = (out / entry["data_file"]).stat().st_size if entry.get("data_file") else 0
    peak = phase.get("peak_rss_bytes", 0)
    split = {k: phase[k] for k in ("own_process_peak_rss_bytes", "export_process_rss_bytes_meanwhile",
                                   "export_process_peak_rss_bytes") if k in phase}
    v = entry["validation"]
    return {"component": name, "dtype": entry["precision"], "params": params, "weights_bytes": weights,
            "wall_s": phase.get("wall_s"), "cpu_s": phase.get("cpu_s"), "load_1m_at_end": phase.get("load_1m_at_end"),
            "peak_rss_bytes": peak, **split, "onnx_bytes": onnx_bytes, "data_bytes": data_bytes,
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
