"""`python scripts/bench.py serve [--bundle DIR] [--requests N] [--steps K] [--rounds R]`: osx serve on a
local Ray (2 CPUs) with 1 and 2 replicas of a bundle (default: the tiny one, exported here first).

Per replica count:
  latency     R rounds, each one bare `Pipeline.generate` + write_video in this process, then the same
              request through the service alone (POST, then GET the mp4 with ?wait=, which answers once the
              job is final), then one GET /healthz (the floor of any request: HTTP + Serve's proxy + one
              Ray hop). p50/p95 of both, the service's overhead at p50 (target < 5 %) and the median of the
              per-round ratios; interleaved, so load on the machine hits both sides alike, and the load
              average before and after beside them. Where the time goes, p50 in ms: bare (generate, of it
              denoise; mp4) and service (POST, dispatch, the replica: generate, of it denoise and progress
              writes; mp4; then the client getting the mp4), split into the replica's generation vs bare
              (proportional to the job) and the rest (fixed per request).
  throughput  N requests posted at once: requests per minute until the last one succeeded, p50/p95 of
              their latencies (queueing included).
Both sides run onnxruntime with the same intra-op threads (one per physical core: osx.runtime.backends).
"""

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

FINAL = ("succeeded", "failed", "cancelled")


def _pct(values, q):
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(q * (len(values) - 1))))], 4)


def _call(base, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read()


def _through_service(base, body, timeout=600.0, parts=None):
    """Seconds from POST to having the mp4; `parts` collects where the time went (ms): the POST's round
    trip, queue + Ray dispatch (created -> started), the replica (started -> finished: generation and
    mp4; of which `Pipeline.run` alone), and the client getting the mp4 (finished -> content received),
    from the job's timestamps (read after the clock stopped)."""
    t0, wall0 = time.perf_counter(), time.time()
    job = json.loads(_call(base, "POST", "/v1/videos", body))["id"]
    posted = time.time()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # long poll: the ingress answers once the job is final (409 if not done yet)
        try:
            _call(base, "GET", f"/v1/videos/{job}/content?wait=30")
            break
        except urllib.error.HTTPError as e:
            if e.code != 409 or json.loads(_call(base, "GET", f"/v1/videos/{job}"))["state"] in FINAL:
                raise
    done, received = time.perf_counter(), time.time()
    status = json.loads(_call(base, "GET", f"/v1/videos/{job}"))
    assert status["state"] == "succeeded", status
    if parts is not None:
        result = status["result"]
        for name, s in (("post", posted - wall0), ("dispatch", status["started"] - status["created"]),
                        ("of_which_to_ray", status["dispatch"]["sent"] - status["created"]),
                        ("of_which_ray_hop", status["dispatch"]["received"] - status["dispatch"]["sent"]),
                        ("of_which_to_thread_and_claim", status["started"] - status["dispatch"]["received"]),
                        ("replica", status["finished"] - status["started"]), ("of_which_generate", result["generate_seconds"]),
                        ("of_which_progress_writes", result["progress_seconds"]), ("of_which_mp4", result["encode_seconds"]),
                        ("of_which_denoise", result["denoise_seconds"]), ("get_mp4", received - status["finished"]),
                        # this round's latency less the replica's generation and mp4: what the service adds per request
                        ("fixed", done - t0 - result["generate_seconds"] - result["encode_seconds"])):
            parts.setdefault(name, []).append(1000 * s)
    return done - t0


def _healthz(base) -> float:
    t0 = time.perf_counter()
    _call(base, "GET", "/healthz")
    return time.perf_counter() - t0


def _tiny_bundle(folder: Path) -> Path:
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    export_bundle(ExportRequest("opensora-v1.2-tiny", folder / "tiny", RANDOM_WEIGHTS, gpu="cpu", progress=lambda msg: None))
    return folder / "tiny"


def main(argv):
    ap = argparse.ArgumentParser(prog="bench.py serve")
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=12, help="posted at once for the throughput figure")
    ap.add_argument("--rounds", type=int, default=16, help="interleaved bare / service rounds for latency")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--proxy", action="store_true", help="through Serve's HTTP proxy, not direct ingress (for comparison)")
    args = ap.parse_args(argv)

    import ray
    from ray import serve

    from osx.runtime.pipeline import Pipeline
    from osx.runtime.serving.app import deploy, start_local_ray
    from osx.runtime.video import write_video

    work = Path(tempfile.mkdtemp(prefix="osx-bench-serve-"))
    bundle = args.bundle or _tiny_bundle(work)
    body = {"prompt": "a red fox running through fresh snow", "seed": 1} | ({"steps": args.steps} if args.steps else {})
    bare_pipe = Pipeline.load(bundle, verify=False)
    bare_pipe.preload()

    def bare(parts):
        t0 = time.perf_counter()
        frames = bare_pipe.generate(body["prompt"], seed=1, steps=args.steps)
        t1 = time.perf_counter()
        write_video(frames, work / "bare.mp4", 24)
        t2 = time.perf_counter()
        parts.setdefault("generate", []).append(1000 * (t1 - t0))
        parts.setdefault("denoise", []).append(1000 * bare_pipe.timings["denoise_s"])
        parts.setdefault("mp4", []).append(1000 * (t2 - t1))
        return t2 - t0

    result = {"bundle": str(bundle), "steps": args.steps or bare_pipe.scheduler.num_sampling_steps, "cpus": 2, "by_replicas": {}}
    for replicas in (1, 2):  # each on a Ray of its own, as `osx serve` starts it (a port of its own: see start_local_ray)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        direct = start_local_ray(2, direct=None if args.proxy else ("127.0.0.1", port), object_store_memory=80 * 2**20)
        try:
            deploy([bundle], store=str(work / f"store{replicas}"), replicas=replicas, queue=args.requests, port=port, verify=False,
                   direct_ingress=direct)
            _through_service(base, body)  # warm: first request loads nothing new, but wakes every process
            bare_s, served_s, floor_s, parts, bare_parts = [], [], [], {}, {}
            load_before = round(os.getloadavg()[0], 2)
            for _ in range(args.rounds):
                bare_s.append(bare(bare_parts))
                served_s.append(_through_service(base, body, parts=parts))
                floor_s.append(_healthz(base))
            load_after = round(os.getloadavg()[0], 2)
            latencies, threads = [], []
            t0 = time.perf_counter()
            for i in range(args.requests):
                threads.append(threading.Thread(target=lambda i=i: latencies.append(_through_service(base, {**body, "seed": i}))))
                threads[-1].start()
            for t in threads:
                t.join(900)
            wall = time.perf_counter() - t0
            p50_bare, p50_served = statistics.median(bare_s), statistics.median(served_s)
            p50 = {k: statistics.median(v) for k, v in parts.items()}
            bare_p50 = {k: statistics.median(v) for k, v in bare_parts.items()}
            result["by_replicas"][replicas] = {
                "ingress": "direct" if direct else "Serve's proxy",
                "latency_alone": {"load_avg_1min": [load_before, load_after],
                                  "bare_p50_s": round(p50_bare, 4), "bare_p95_s": _pct(bare_s, 0.95),
                                  "service_p50_s": round(p50_served, 4), "service_p95_s": _pct(served_s, 0.95),
                                  "overhead_p50_s": round(p50_served - p50_bare, 4),
                                  "overhead_p50_pct": round(100 * (p50_served / p50_bare - 1), 1),
                                  "overhead_paired_median_pct": round(100 * statistics.median(b / a - 1 for a, b in zip(bare_s, served_s)), 1),
                                  "target_pct": 5.0,
                                  # the replica's generation vs bare grows with the job; the rest is per request
                                  "replica_generate_vs_bare_pct": round(100 * (p50["of_which_generate"] / bare_p50["generate"] - 1), 1),
                                  "fixed_ms": round(p50["fixed"], 1),
                                  "healthz_p50_ms": round(1000 * statistics.median(floor_s), 1),
                                  "bare_parts_p50_ms": {k: round(v, 1) for k, v in bare_p50.items()},
                                  "service_parts_p50_ms": {k: round(v, 1) for k, v in p50.items() if k != "fixed"}},
                "throughput": {"load_avg_1min": round(os.getloadavg()[0], 2), "requests": len(latencies), "wall_s": round(wall, 2),
                               "requests_per_minute": round(60 * len(latencies) / wall, 1),
                               "p50_s": _pct(latencies, 0.5), "p95_s": _pct(latencies, 0.95)},
            }
        finally:
            serve.shutdown()
            ray.shutdown()
    return result
