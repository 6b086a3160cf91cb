"""`osx serve --address` joins a real, separate Ray cluster: one started here with `ray start --head`
(2 CPUs, no dashboard, token authentication with a token made for the test), joined once with `auto`
(RAY_ADDRESS) and once through Ray Client (`ray://127.0.0.1:PORT`). Each time a request succeeds and
Ctrl-C takes the application off the cluster, which stays up: the second `osx serve` could not answer on
its own port if the first one's Serve instance were left behind, and at the end no Serve controller is
left. The cluster is stopped by the ids of the processes `ray start` started (never `ray stop`, which
stops every Ray on the machine). Every wait is bounded."""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
pytestmark = pytest.mark.slow  # a cluster and two services started and stopped: ~40-60 s on 2 busy cores

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_and_children(pgid: int) -> set[int]:
    """The processes of `ray start`'s process group and their descendants (Ray's workers start their own
    sessions, as children of the raylet)."""
    parent = {}
    for entry in os.listdir("/proc"):
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            parent[int(entry)] = (int(fields[1]), int(fields[2]))  # ppid, pgrp
        except (ValueError, OSError, IndexError):
            continue
    found = {pid for pid, (_, pgrp) in parent.items() if pgrp == pgid}
    while True:
        more = {pid for pid, (ppid, _) in parent.items() if ppid in found} - found
        if not more:
            return found
        found |= more


def _stop(pids: set[int], grace_s: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() and "zombie" not in _state(p) for p in pids):
            time.sleep(0.2)


def _state(pid: int) -> str:
    try:
        return next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:"))
    except (OSError, StopIteration):
        return "zombie"


@pytest.fixture(scope="module")
def cluster():
    """A head node on this machine: (GCS port, Ray Client port, environment that reaches it, its temp folder)."""
    tmp = tempfile.mkdtemp(prefix="osxray-")  # short: Ray's socket paths live under it
    gcs, client, agent = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16), "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    start = subprocess.Popen([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
                              f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                              f"--temp-dir={tmp}", "--disable-usage-stats"],
                             env={k: v for k, v in env.items() if k != "RAY_ADDRESS"}, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = start.communicate(timeout=120)
        assert start.returncode == 0, out[-3000:]
        yield gcs, client, env, tmp
    finally:
        _stop(_group_and_children(start.pid))
        shutil.rmtree(tmp, ignore_errors=True)


def _get(url: str, timeout: float = 30.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _client_server_logs(tmp: str) -> str:
    """The tails of the head's Ray Client server logs: why a `ray://` join failed, in the assertion's message."""
    logs = sorted(Path(tmp).glob("session_latest/logs/ray_client_server*.err"))
    return "".join(f"\n--- {p.name} ---\n{p.read_text(errors='replace')[-1500:]}" for p in logs)


def _serve_one_request(tiny_bundle, store, address: str, env: dict, tmp: str) -> str:
    """`osx serve --address ADDRESS`: up, one request to succeeded, Ctrl-C; returns its stderr."""
    port = _free_port()
    proc = subprocess.Popen([str(BIN / "osx"), "serve", str(tiny_bundle), "--address", address, "--store", str(store),
                             "--port", str(port), "--no-verify"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, base = time.monotonic() + 180, f"http://127.0.0.1:{port}"
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                assert _get(base + "/healthz", timeout=5)["status"] == "ok"
                break
            except OSError:
                time.sleep(1)
        assert proc.poll() is None and time.monotonic() < deadline, f"osx serve did not come up: {proc.communicate(timeout=30)}{_client_server_logs(tmp)}"
        body = json.dumps({"prompt": "a red fox", "seed": 3, "steps": 2}).encode()
        req = urllib.request.Request(base + "/v1/videos", data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            job = json.loads(r.read())["id"]
        status = _get(f"{base}/v1/videos/{job}?wait=60", timeout=90)
        assert status["state"] == "succeeded", status
        with urllib.request.urlopen(f"{base}/v1/videos/{job}/content", timeout=30) as r:
            assert r.read(12)[4:8] == b"ftyp"  # an mp4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=180)  # Serve's shutdown took over 90 s at load 8
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    with pytest.raises(OSError):  # its HTTP proxy left with it
        _get(base + "/healthz", timeout=5)
    return err


def test_serve_joins_a_separate_cluster_and_leaves_it_clean(cluster, tiny_bundle, tmp_path):
    gcs, client, env, tmp = cluster
    _serve_one_request(tiny_bundle, tmp_path / "store", "auto", env, tmp)
    _serve_one_request(tiny_bundle, tmp_path / "store", f"ray://127.0.0.1:{client}", env, tmp)
    left = subprocess.run([sys.executable, "-c", "import ray; ray.init(address='auto', log_to_driver=False)\n"
                           "try:\n    ray.get_actor('SERVE_CONTROLLER_ACTOR', namespace='serve'); print('left')\n"
                           "except ValueError:\n    print('gone')"], env=env, capture_output=True, text=True, timeout=120)
    assert left.stdout.strip().splitlines()[-1:] == ["gone"], left.stdout + left.stderr[-2000:]

