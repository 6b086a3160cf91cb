"""`osx serve` on Ray Serve: one application "osx", its HTTP ingress and one deployment of `Generator`
replicas per bundle.

    client --HTTP--> Ingress (FastAPI, 1 replica) --DeploymentHandle--> Generator replicas of bundle A
                          |                                         +-> Generator replicas of bundle B
                          +---- job store (osx.runtime.serving.jobs) ----+   (every replica reads/writes)

The ingress checks a request with the bundle's own `Pipeline.prepare_request` (so a 400 carries the
message `osx generate` prints), bounds the queue (429 past `replicas x (1 + queue)` open jobs per
bundle), writes the job as `queued` and answers 202; a background task hands it to the bundle's
replicas through Ray (which routes, queues and autoscales) and waits. A replica holds one `Pipeline`
(one generation at a time: max_ongoing_requests=1), preloaded and resident: no request reloads a component
(the VAE encoder loads at the first reference and stays). It claims the job, reports progress into the store
at every step, stops between steps when the job's cancel file appears, and writes the mp4 before the
state says `succeeded`. If a replica dies mid-generation, Ray restarts it and the ingress retries the
job once (on whichever replica Ray picks), then fails it with the reason: an accepted job always ends
in succeeded, failed or cancelled. A reference image or video travels in the request itself (base64;
osx.runtime.serving.references). On a Ray that `osx serve` starts, the ingress replica answers HTTP
itself (Serve's direct ingress), without a hop through Serve's proxy for every request.
"""

# No `from __future__ import annotations`: FastAPI reads the route methods' annotations at runtime.
import asyncio
import logging
import math
import os
import re
import socket
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from ray import serve

from osx.errors import OsxError
from osx.runtime.progress import Fractions
from osx.runtime.serving import references
from osx.runtime.serving.jobs import FINAL, JobStore
from osx.runtime.shim import _GENERATE_OPTIONS, _parse_options, _ShimError
from osx.runtime import t2i2v

log = logging.getLogger("osx.serve")
MAX_BODY = 12 * 2**20  # bytes; a request is a prompt, a few numbers and at most one reference file in base64
# Progress goes to the store, and the cancel file is looked for, at most this often (and at the end of
# every phase): each write replaces a file (~1.7 ms here), which at every step was 6 % of a 10-step tiny job;
# and looking for the cancel file at every step still cost a 100-step job 20-22 ms in a replica (bench.py
# serve, load ~13; ~2 ms for the same calls alone in one process). A cancel is seen within this time, or at
# the end of the step when a step takes longer.
PROGRESS_EVERY_S = 0.2
_REQUEST_FIELDS = {"prompt": str, "model": (str, type(None)), **_GENERATE_OPTIONS}
app = FastAPI(title="osx serve", docs_url=None, redoc_url=None)


def gpu_bundle(bundle) -> bool:
    """True when any component runs on a GPU backend (a replica then takes one GPU, else CPUs)."""
    return any(c.backend != "onnxruntime" for c in bundle.components.values())


@serve.deployment(max_ongoing_requests=1)
class Generator:
    """One replica: one Pipeline, one generation at a time, all of it on one thread of its own.

    Why its own thread: Ray Serve runs a sync method on a pool thread that is not the one that built the
    replica; there, measured in a replica with the tiny bundle, a generation took 14.1k page faults instead
    of 5.8k and 20-38 ms more (+6-12 %); with MALLOC_ARENA_MAX=1 (one malloc arena for all threads) the
    difference went away. Loading and generating on the same thread is as fast as `Pipeline.generate` in the caller's
    own process, and the replica's event loop stays free while it runs."""

    def __init__(self, bundle: str, store: str, keep_s: float, verify: bool = True):
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="osx-generate")
        self.pipeline = self.worker.submit(self._load, bundle, verify).result()
        self.store = JobStore(store, keep_s)
        self.replica = ray.get_runtime_context().get_actor_name()

    @staticmethod
    def _load(bundle: str, verify: bool):
        from osx.runtime.pipeline import Pipeline

        pipeline = Pipeline.load(bundle, verify=verify)
        pipeline.preload()
        return pipeline

    async def generate(self, job_id: str, attempt: int, fields: dict, sent: float | None = None) -> str:
        """Run one attempt of a job; returns its final state ("skipped" if someone else claimed it).
        `sent`: when the ingress handed it to Ray (time.time()), kept with `received` in the status."""
        hops = {"sent": sent, "received": time.time()}
        return await asyncio.get_running_loop().run_in_executor(self.worker, self._generate, job_id, attempt, fields, hops)

    def _generate(self, job_id: str, attempt: int, fields: dict, hops: dict | None = None) -> str:
        if not self.store.claim(job_id, attempt):
            return "skipped"
        status = self.store.read(job_id)
        if self.store.cancel_requested(job_id):
            return self.store.write({**status, "state": "cancelled", "error": "cancelled before it started"})["state"]
        status.update(state="running", attempt=attempt, replica=self.replica, started=time.time(), dispatch=hops)
        self.store.write(status)
        try:
            options, refs = references.split_fields(fields)  # refs: a reference file kept in the store, its options
            request = self.pipeline.prepare_request(**options)
            progress = self._progress(status, request, reference="image" in refs or "video" in refs)
            frames = self.pipeline.run(request, progress=progress, **refs)
            self._write_video(status, request, frames, progress.seconds)
        except Exception as e:  # noqa: BLE001 - every outcome ends the job in a final state
            from osx.runtime.pipeline import GenerationCancelled

            if isinstance(e, GenerationCancelled):
                status.update(state="cancelled", error=str(e))
            elif isinstance(e, OsxError):
                status.update(state="failed", error=e.message + (f" ({e.hint})" if e.hint else ""))
            else:
                log.error("job %s failed:\n%s", job_id, traceback.format_exc())
                status.update(state="failed", error=f"internal error: {e!r}")
            self.store.write(status)
        return status["state"]

    def _progress(self, status: dict, request, reference: bool = False):
        """The pipeline's progress callback: progress into the store; False (stop) once cancelled.
        Work units: each step of each phase the pipeline announces (osx.runtime.progress), and writing the file."""
        fractions = Fractions(self.pipeline.progress_phases(request, reference), extra=1)
        t0, last_io = time.perf_counter(), -math.inf

        def progress(event: dict) -> bool:
            nonlocal last_io
            t1 = time.perf_counter()
            fraction = fractions(event)
            elapsed = time.perf_counter() - t0
            status["progress"] = {"phase": event["phase"], "step": event["step"], "total": event["total"],
                                  "fraction": round(fraction, 4), "eta": round(elapsed * (1 - fraction) / fraction, 2) if fraction else None}
            go_on = True
            if t1 - last_io >= PROGRESS_EVERY_S or event["step"] == event["total"]:
                self.store.write(status)
                go_on = not self.store.cancel_requested(status["id"])
                last_io = t1
            progress.seconds += time.perf_counter() - t1
            return go_on

        progress.seconds = 0.0  # spent here (store writes, cancel checks): part of Pipeline.run's time
        return progress

    def _write_video(self, status: dict, request, frames, progress_seconds: float = 0.0) -> None:
        from osx.runtime.video import resolve_codec, write_video

        path = self.store.video(status["id"])
        codec = resolve_codec(path)
        t0 = time.perf_counter()
        write_video(frames, path, request.fps, codec)  # temp name + rename
        encode_s = time.perf_counter() - t0
        h, w = frames.shape[1:3]
        status.update(state="succeeded", progress={**status["progress"], "phase": "done", "fraction": 1.0, "eta": 0.0},
                      result={"frames": len(frames), "width": w, "height": h, "fps": request.fps, "codec": codec,
                              "seed": request.seed, "seconds": round(time.time() - status["started"], 3),
                              "generate_seconds": round(self.pipeline.timings.get("total_s", 0.0), 3),
                              "denoise_seconds": round(self.pipeline.timings.get("denoise_s", 0.0), 3),
                              "progress_seconds": round(progress_seconds, 4), "encode_seconds": round(encode_s, 4),
                              "url": f"/v1/videos/{status['id']}/content"})
        self.store.write(status)


def _error(code: int, message: str, hint: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "hint": hint}, status_code=code, headers=headers)


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, models: dict[str, dict], generators: dict, store: str, keep_s: float):
        """models: name -> {"bundle": path, "capacity": open jobs allowed, "max_steps": int, "replicas": str};
        generators: name -> the handle of its Generator deployment."""
        from osx.runtime.pipeline import Pipeline

        self.models = models
        self.store = JobStore(store, keep_s).check()
        # For checking requests only: components are loaded lazily, so these load nothing heavy.
        self.pipelines = {name: Pipeline.load(m["bundle"], verify=False) for name, m in models.items()}
        self.handles = generators
        self.open: dict[str, dict[str, int]] = {name: {} for name in models}  # model -> job id -> attempt
        self.tasks: dict[str, asyncio.Task] = {}  # job id -> the task handing it out
        self.seconds: list[float] = []  # recent job durations, for Retry-After
        self.last_sweep = 0.0

    # --- pages -----------------------------------------------------------------------------------
    @app.get("/")
    def page(self):
        return HTMLResponse(Path(__file__).with_name("index.html").read_text())

    @app.get("/healthz")
    def healthz(self):
        return {"status": "ok", "models": list(self.models), "open_jobs": {n: len(j) for n, j in self.open.items()}}

    @app.get("/v1/models")
    def list_models(self):
        out = []
        for name, m in self.models.items():
            pipe = self.pipelines[name]
            r = pipe.prepare_request("")  # every default filled in, whatever the bundle's family
            out.append({"name": name, "model": pipe.model.name, "replicas": m["replicas"], "queue_limit": m["capacity"],
                        "limits": {**pipe.limits(), "steps": [1, m["max_steps"]]}, "supported": pipe.supported(),
                        "t2i2v": t2i2v.has_t2i(pipe),  # text -> image -> video available (on by default without a reference)
                        "references": pipe.reference_modes(),  # {"image": conditions, "video": conditions}, {} without a VAE encoder
                        "defaults": {k: getattr(r, k) for k in ("num_frames", "height", "width", "fps", "steps", "guidance_scale", "seed")}})
        return {"models": out}

    # --- jobs ------------------------------------------------------------------------------------
    @app.post("/v1/videos")
    async def submit(self, http: Request):
        await self._sweep()
        body = await http.body()
        if len(body) > MAX_BODY:
            return _error(413, f"request body is {len(body)} bytes; at most {MAX_BODY} allowed")
        try:
            fields = _parse_options(body.decode("utf-8", "replace") or "{}", _REQUEST_FIELDS)
        except _ShimError as e:
            return _error(400, str(e).replace("options", "fields").replace("option ", "field "))
        name = fields.pop("model", None) or (next(iter(self.models)) if len(self.models) == 1 else None)
        if name not in self.models:
            return _error(400, f"unknown model {name!r}" if name else "no model given", hint=f"choose one of {', '.join(self.models)} (GET /v1/models)")
        if "prompt" not in fields:
            return _error(400, "prompt is required", hint='send {"prompt": "..."}; an empty string is allowed')
        max_steps = self.models[name]["max_steps"]
        try:
            upload = references.decode(fields, self.pipelines[name])
            request = self.pipelines[name].prepare_request(**references.split_fields(fields)[0])
            asked = {"steps": request.steps, "t2i_steps": t2i2v.steps(self.pipelines[name], request, upload is not None)}
        except OsxError as e:
            return _error(400, e.message, e.hint)
        for field, steps in asked.items():
            if (steps or 0) > max_steps:
                return _error(400, f"{field}={steps}: this service allows at most {max_steps}",
                              hint=f"ask for fewer {field.replace('_', ' ')} (osx serve --max-steps)")
        limit = self.models[name]["capacity"]
        if len(self.open[name]) >= limit:
            wait = max(1, math.ceil(sorted(self.seconds)[len(self.seconds) // 2])) if self.seconds else 5
            return _error(429, f"queue full: {limit} requests for {name} are already running or queued",
                          hint=f"retry after {wait} s", headers={"Retry-After": str(wait)})
        status = self.store.create(name, fields if upload is None else {**fields, upload[0]: f"({len(upload[1])} bytes)"})
        if upload is not None:  # kept in the job's folder; the replica gets its path
            try:
                fields = {**fields, upload[0]: str(references.keep(*upload, self.store.root / status["id"]))}
                await asyncio.to_thread(references.check, self.pipelines[name], request, references.split_fields(fields)[1])
            except OsxError as e:
                self.store.delete(status["id"])
                return _error(400, e.message, e.hint)
        self.open[name][status["id"]] = 1
        self.tasks[status["id"]] = asyncio.get_running_loop().create_task(self._drive(name, status["id"], fields))
        return JSONResponse(status, status_code=202, headers={"Location": f"/v1/videos/{status['id']}"})

    async def _drive(self, name: str, job_id: str, fields: dict) -> None:
        """Hand the job to the bundle's replicas; retry once if its replica dies; always end it."""
        t0 = time.monotonic()
        try:
            for attempt in (1, 2):
                self.open[name][job_id] = attempt
                try:
                    await self.handles[name].generate.remote(job_id, attempt, fields, time.time())
                    break
                except Exception as e:  # noqa: BLE001 - the replica died or Ray could not run the call
                    reason = f"its replica stopped during generation ({type(e).__name__})"
                    log.warning("job %s attempt %d: %s", job_id, attempt, e)
                    status = self.store.read(job_id)
                    if status is None or status["state"] in FINAL:
                        break
                    if attempt == 1 and not self.store.cancel_requested(job_id):
                        self.store.write({**status, "state": "queued", "attempt": 2, "progress": None, "retried_because": reason})
                    elif self.store.claim(job_id, attempt + 1):  # no replica will write to it any more
                        final = "cancelled" if self.store.cancel_requested(job_id) else "failed"
                        self.store.write({**status, "state": final, "error": f"{reason}; tried {attempt} time(s)"}, epoch=attempt + 1)
                        break
        finally:
            self.open[name].pop(job_id, None)
            self.tasks.pop(job_id, None)
            self.seconds = (self.seconds + [time.monotonic() - t0])[-50:]

    async def _until_final(self, job_id: str, wait: float) -> None:
        """`?wait=S` (at most 60): answer once the job is final or S seconds passed, whichever is first,
        instead of being polled (for jobs this ingress is handing out). A poll every N ms adds N/2 ms to a
        job's latency on average; this adds one wake-up."""
        task = self.tasks.get(job_id)
        if task is not None and wait > 0:
            await asyncio.wait({task}, timeout=min(float(wait), 60.0))

    @app.get("/v1/videos/{job_id}")
    async def status(self, job_id: str, wait: float = 0.0):
        await self._until_final(job_id, wait)
        status = self.store.read(job_id)
        return status if status is not None else _error(404, f"no video job {job_id!r}", hint="it never existed or has expired")

    @app.get("/v1/videos/{job_id}/content")
    async def content(self, job_id: str, wait: float = 0.0):
        """The mp4; with `?wait=S` it first waits as the status does (one request instead of two)."""
        await self._until_final(job_id, wait)
        status = self.store.read(job_id)
        if status is None:
            return _error(404, f"no video job {job_id!r}", hint="it never existed or has expired")
        if status["state"] != "succeeded":
            return _error(409, f"job {job_id} is {status['state']}, there is no video", hint="wait until its state is succeeded (?wait=S waits for it)")
        return FileResponse(self.store.video(job_id), media_type="video/mp4", filename=f"{job_id}.mp4")

    @app.delete("/v1/videos/{job_id}")
    def cancel_or_delete(self, job_id: str):
        """A running or queued job is cancelled (between two steps); a finished one is deleted."""
        status = self.store.read(job_id)
        if status is None:
            return _error(404, f"no video job {job_id!r}", hint="it never existed or has expired")
        if status["state"] in FINAL:
            self.store.delete(job_id)
            return {"id": job_id, "deleted": True}
        self.store.request_cancel(job_id)
        attempt = self.open.get(status["model"], {}).get(job_id, status["attempt"])
        if self.store.claim(job_id, attempt):  # no replica has started it: it ends here
            status = self.store.write({**self.store.read(job_id), "state": "cancelled", "error": "cancelled before it started"},
                                      epoch=attempt)
        return JSONResponse({**status, "cancel_requested": True}, status_code=202)

    async def _sweep(self) -> None:
        """Remove expired jobs, at most once a minute (and never more often than --keep)."""
        if time.monotonic() - self.last_sweep > min(60.0, self.store.keep_s):
            self.last_sweep = time.monotonic()
            await asyncio.to_thread(self.store.expire)


def app_name(bundle: Path, taken: set[str]) -> str:
    """A bundle's name in the API: its folder name, made unique."""
    base = re.sub(r"[^A-Za-z0-9._-]", "-", Path(bundle).resolve().name) or "bundle"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}-{n}", n + 1
    return name


def generator_name(model: str) -> str:
    """The Serve deployment (in application "osx") of a bundle's replicas."""
    return f"Generator-{model}"


def check_cluster(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast where joining would hang: `ray.init` waits for a GCS that does not answer for minutes
    (measured: still waiting after 85 s), which is what `auto` finds after a cluster was stopped without
    `ray stop` (its address stays in Ray's temp folder) or with RAY_ADDRESS naming a stopped one.
    Resolves the address as Ray does and connects to it once, within `timeout_s`."""
    hint = ("start the cluster first (`ray start --head` on its head node) or give the address of a running one "
            "(--address ray://HOST:PORT, or RAY_ADDRESS for auto); without --address, osx serve starts a local Ray")
    if address.startswith("ray://"):
        target = address.removeprefix("ray://")
    else:
        from ray._private.services import get_ray_address_from_environment

        try:
            target = get_ray_address_from_environment(address, None)
        except ConnectionError:
            raise OsxError(f"cannot join the Ray cluster at {address}: no running Ray cluster was found", hint=hint) from None
    host, _, port = str(target).rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        raise OsxError(f"cannot join the Ray cluster at {address}: nothing answers at {target} ({reason})", hint=hint) from None


def start_local_ray(num_cpus: int | None = None, direct: tuple[str, int] | None = None, **options) -> bool:
    """A local Ray instance for `osx serve` (loopback only). Ray starts its workers 15 nice levels below
    the process that started it (its `worker_niceness`), so on a machine with any other load a replica got
    the CPU last: measured with `bench.py serve` on the shared 2-core machine, the pipeline ran 1.2-1.5x
    slower in a replica than in the benchmark's own process. Replicas are the work here: they run at the
    starting process's priority.

    direct: (host, port): let the ingress replica answer HTTP itself there (Serve's direct ingress) instead
    of Serve's proxy relaying every request to it through Ray: one `GET /healthz` took 1.4 ms instead of
    4.6-5.2 ms here. Ray's processes read this from their environment when they start, so it is set for
    this `ray.init` only. Serve binds that port without SO_REUSEADDR and gives it up on the first failure,
    so where it cannot be bound so (another program; or a service that stopped less than a minute ago left
    connections in TIME_WAIT) the proxy serves it as before. Returns whether direct ingress is on: pass it
    to `deploy`."""
    env = {"RAY_worker_niceness": os.environ.get("RAY_worker_niceness", "0"),
           # Fewer hand-overs between threads per request, and Ray's handle calls over gRPC: the hand-over
           # from ingress to replica took 3.3 ms instead of 6.4-7.1, and the whole fixed cost of a job 11-12 ms
           # instead of 18 (bench.py serve, load 9). Serve runs a replica's code on its event loop then:
           # `Generator` generates on a thread of its own anyway, the ingress's handlers do not block.
           "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
           "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1"}
    env = {k: os.environ.get(k, v) for k, v in env.items()}  # the user's own settings win
    on = direct is not None and _bindable(*direct)
    if on:
        env.update(RAY_SERVE_ENABLE_DIRECT_INGRESS="1", RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(direct[1]),
                   RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(direct[1] + 1),  # range(min, max)
                   # no load balancer in front of a local service: nothing to wait for when it stops
                   RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, **options)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return on


def _bindable(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now, binding as Serve's direct ingress does."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def deploy(bundles: list[Path], *, store: str, keep_s: float = 3600.0, replicas: int = 1, autoscale: tuple[int, int] | None = None,
           queue: int = 2, max_steps: int = 200, replica_cpus: float = 1.0, verify: bool = True,
           host: str = "127.0.0.1", port: int = 8000, direct_ingress: bool = False) -> dict[str, dict]:
    """Deploy one application "osx": the ingress and, per bundle, a deployment of its `Generator` replicas
    (Ray must be initialised). The API answers on host:port: from Serve's HTTP proxy, or with
    `direct_ingress` (what `start_local_ray(direct=(host, port))` returned) from the ingress replica itself,
    Serve's proxy then left on a free port of its own. Returns the models as the ingress sees them.
    Blocks until every replica is up."""
    from osx.bundle import Bundle

    JobStore(store, keep_s).check()
    serve.start(http_options={"host": host, "port": _free_port(host) if direct_ingress else port})
    models: dict[str, dict] = {}
    generators = {}
    for path in bundles:
        bundle = Bundle.open(path, verify=False)
        name = app_name(path, set(models))
        # A video job runs for minutes: scale up after 5 s of queueing (Ray's default waits 30 s, averaged
        # over 30 s; here over 15 s, more than its 10 s metrics interval), scale down only after 10 minutes without the load (Ray's default).
        scaling = {"autoscaling_config": {"min_replicas": autoscale[0], "max_replicas": autoscale[1], "target_ongoing_requests": 1,
                                          "upscale_delay_s": 5.0, "look_back_period_s": 15.0}} \
            if autoscale else {"num_replicas": replicas}
        actor = {"num_gpus": 1} if gpu_bundle(bundle) else {"num_cpus": replica_cpus}
        most = autoscale[1] if autoscale else replicas
        models[name] = {"bundle": str(Path(path).resolve()), "capacity": most * (1 + queue), "max_steps": max_steps,
                        "replicas": f"{autoscale[0]}..{autoscale[1]}" if autoscale else str(replicas)}
        generators[name] = Generator.options(name=generator_name(name), ray_actor_options=actor, **scaling).bind(
            models[name]["bundle"], str(store), keep_s, verify)
    serve.run(Ingress.bind(models, generators, str(store), keep_s), name="osx", route_prefix="/")
    return models
