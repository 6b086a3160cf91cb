"""`osx serve BUNDLE [BUNDLE...]`: an HTTP video service on Ray Serve (README "Serving").

Order of work: options and bundles are checked first (exit 2 with a message), then Ray is joined or
started, then every bundle's replicas and the ingress are deployed; Ctrl-C shuts them down.
"""

from __future__ import annotations

import importlib.util
import re
import tempfile
import time
from pathlib import Path

import click

from osx.errors import OsxError

_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(ctx, param, value: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value or "")
    if not m or float(m.group(1)) <= 0:
        raise click.BadParameter(f"{value!r} is not a duration like 90s, 30m, 1h or 2d")
    return float(m.group(1)) * _UNITS[m.group(2)]


_JOIN_HINT = ("check that it runs (`ray status` on its head node) and the address; with `auto`, RAY_ADDRESS or the cluster "
              "this machine started is used; a cluster with token authentication also needs RAY_AUTH_MODE=token here (its "
              "token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")


def _join(ray, address: str, attempts: int = 3, pause_s: float = 2.0) -> None:
    """Join the cluster at `address`. Through Ray Client the head starts a server process per client, which can fail
    to come up in time on a busy head ("Initialization failure from server"): that is tried again, at most
    `attempts` times; anything else (no cluster, refused, wrong token) fails at once."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, log_to_driver=False)
            return
        except (ConnectionError, RuntimeError, ValueError) as e:  # no cluster there, refused, wrong token
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # the server's reason is the last line of the traceback it sends back
            reason = (f"{lines[0]} {lines[-1]}" if len(lines) > 1 and lines[0].endswith(":") else lines[0]) if lines else type(e).__name__
            if "Initialization failure from server" not in reason or attempt == attempts:
                tried = f" (tried {attempt} times)" if attempt > 1 else ""
                raise OsxError(f"cannot join the Ray cluster at {address}{tried}: {reason}", hint=_JOIN_HINT) from None
            ray.shutdown()
            time.sleep(pause_s)


def _autoscale(ctx, param, value: str | None):
    if value is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", value)
    if not m or not 0 <= int(m.group(1)) <= int(m.group(2)) or int(m.group(2)) < 1:
        raise click.BadParameter(f"{value!r} is not MIN:MAX with 0 <= MIN <= MAX and MAX >= 1, e.g. 1:4")
    return int(m.group(1)), int(m.group(2))


def _address(ctx, param, value: str | None):
    if value is not None and value != "auto" and not re.fullmatch(r"ray://[^\s/:]+:\d{1,5}", value):
        raise click.BadParameter(f"{value!r}: use auto (the cluster this machine belongs to) or ray://HOST:PORT")
    return value


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--replicas", type=click.IntRange(1, 4096), default=1, show_default=True, help="Replicas per bundle (each holds one pipeline).")
@click.option("--autoscale", callback=_autoscale, metavar="MIN:MAX", default=None, help="Let Ray Serve scale each bundle between MIN and MAX replicas instead.")
@click.option("--address", callback=_address, default=None, help="Join a Ray cluster: auto or ray://HOST:PORT (default: start a local one).")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP address (0.0.0.0 to listen on every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for jobs and videos, readable by every replica (shared storage on a cluster; required with --address).")
@click.option("--keep", callback=_duration, default="1h", show_default=True, help="How long finished videos are kept (90s, 30m, 1h, 2d).")
@click.option("--queue", type=click.IntRange(0, 10000), default=2, show_default=True,
              help="Requests waiting per replica beyond the one it runs; past replicas x (1 + queue) open jobs: 429.")
@click.option("--max-steps", type=click.IntRange(1, 100000), default=200, show_default=True, help="Most denoising steps a request may ask for.")
@click.option("--replica-cpus", type=click.FloatRange(0.01, 1024), default=1.0, show_default=True, help="CPUs each replica reserves (onnxruntime bundles; TensorRT ones take one GPU).")
@click.option("--num-cpus", type=click.IntRange(1, 4096), default=None, help="CPUs of the local Ray instance (default: all).")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundles' files in each replica.")
def serve(bundles, replicas, autoscale, address, host, port, store, keep, queue, max_steps, replica_cpus, num_cpus, no_verify):
    """Serve BUNDLE(s) over HTTP on Ray Serve: a JSON API under /v1 and a web page at /."""
    from osx.bundle import Bundle

    if autoscale and replicas != 1:
        raise OsxError("--replicas and --autoscale exclude each other", hint="give one of them")
    if address and store is None:
        raise OsxError("--address needs --store", hint="give a folder on storage that every machine of the cluster mounts")
    for path in bundles:
        Bundle.open(path, verify=False).verify(checksums=False)
    # the user's own mistakes first (the same message whether or not the extra is installed)
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
        raise OsxError("osx serve needs Ray Serve, which is not installed", hint="pip install -e '.[serve]'")
    store = store or Path(tempfile.gettempdir()) / "osx-serve"

    import ray
    from ray import serve as ray_serve

    from osx.runtime.serving.app import check_cluster, deploy, start_local_ray

    direct = False
    if address:
        check_cluster(address)  # before ray.init, which would wait for minutes on an address nobody answers
        _join(ray, address)
    else:
        direct = start_local_ray(num_cpus, direct=(host, port))  # the ingress answers HTTP itself where it can
    try:
        models = deploy(list(bundles), store=str(store), keep_s=keep, replicas=replicas, autoscale=autoscale, queue=queue,
                        max_steps=max_steps, replica_cpus=replica_cpus, verify=not no_verify, host=host, port=port,
                        direct_ingress=direct)
        shown = "localhost" if host in ("127.0.0.1", "0.0.0.0") else host
        click.echo(f"serving {', '.join(models)} at http://{shown}:{port}/ (jobs in {store}); Ctrl-C stops")
        while True:  # in short sleeps: a Ctrl-C taken by one of Ray's threads is then seen here within a second
            time.sleep(1)
    except KeyboardInterrupt:
        click.echo("stopping", err=True)
    finally:
        ray_serve.shutdown()
        ray.shutdown()
