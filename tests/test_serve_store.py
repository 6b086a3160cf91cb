"""The job store of `osx serve` and the command's checks before it starts Ray (no Ray needed)."""

import socket
import time

import pytest

from osx.cli import main
from osx.runtime.serving.jobs import JobStore


def test_job_lifecycle_is_atomic_and_claims_are_exclusive(tmp_path):
    store = JobStore(tmp_path / "store", keep_s=60).check()
    job = store.create("tiny", {"prompt": "x"})
    assert store.read(job["id"])["state"] == "queued"
    assert store.claim(job["id"], 1) and not store.claim(job["id"], 1) and store.claim(job["id"], 2)
    store.update(job["id"], state="running", progress={"step": 1})
    assert not store.cancel_requested(job["id"])
    store.request_cancel(job["id"])
    assert store.cancel_requested(job["id"])
    done = store.update(job["id"], state="cancelled")
    assert done["finished"] == done["updated"]
    # only the status and the markers: no temporary file left behind
    assert sorted(p.name for p in (tmp_path / "store" / job["id"]).iterdir()) == ["cancel", "claim.1", "claim.2", "status.1.json"]


def test_a_dead_replicas_late_write_cannot_overwrite_the_retry(tmp_path):
    """Ray can report a replica dead while its process still writes a progress update: the retry's
    status (attempt 2, retried_because) must survive it, and so must everything attempt 2 writes."""
    store = JobStore(tmp_path / "store").check()
    job = store.create("tiny", {"prompt": "x"})
    assert store.claim(job["id"], 1)
    zombie = store.update(job["id"], state="running", progress={"step": 2})
    store.write({**store.read(job["id"]), "state": "queued", "attempt": 2, "progress": None, "retried_because": "died"})
    store.write({**zombie, "progress": {"step": 3}})  # the dead replica's late write (attempt 1)
    assert store.claim(job["id"], 2)
    status = store.read(job["id"])
    assert status["state"] == "queued" and status["attempt"] == 2 and status["retried_because"] == "died"
    store.write({**status, "state": "succeeded"})
    store.write({**zombie, "progress": {"step": 4}})
    assert store.read(job["id"])["state"] == "succeeded" and store.read(job["id"])["retried_because"] == "died"
    # the ingress failing attempt 2 for good writes as the holder of claim 3, outranking attempt 2's writes
    assert store.claim(job["id"], 3)
    store.write({**status, "state": "failed"}, epoch=3)
    store.write({**status, "progress": {"step": 9}})
    assert store.read(job["id"])["state"] == "failed" and store.read(job["id"])["attempt"] == 2


def test_ids_never_leave_the_store(tmp_path):
    store = JobStore(tmp_path / "store").check()
    for bad in ("../x", "vid_../../etc", "/etc/passwd", "vid_" + "0" * 23, "", None, 7):
        assert store.folder(bad) is None and store.read(bad) is None


def test_finished_jobs_expire_after_keep_others_stay(tmp_path):
    store = JobStore(tmp_path / "store", keep_s=10).check()
    old, fresh, running = (store.create("tiny", {"prompt": str(i)}) for i in range(3))
    store.update(old["id"], state="succeeded")
    store.update(fresh["id"], state="failed")
    store.update(running["id"], state="running")
    now = time.time()
    store.update(old["id"], finished=now - 11)
    assert store.expire(now) == [old["id"]]
    assert store.read(old["id"]) is None and not (tmp_path / "store" / old["id"]).exists()
    assert store.read(fresh["id"])["state"] == "failed" and store.read(running["id"])["state"] == "running"
    assert store.expire(now + 11) == [fresh["id"]]  # a running job never expires


def test_unwritable_store_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(Exception, match="cannot use .* as the job store"):
        JobStore(tmp_path / "file" / "store").check()


@pytest.mark.parametrize("args, message", [
    (["--autoscale", "3:1"], "is not MIN:MAX"),
    (["--autoscale", "1:2", "--replicas", "2"], "--replicas and --autoscale exclude each other"),
    (["--keep", "soon"], "is not a duration"),
    (["--address", "10.0.0.1:6379"], "use auto (the cluster this machine belongs to) or ray://HOST:PORT"),
    (["--address", "auto"], "--address needs --store"),
])
def test_serve_refuses_bad_options_before_starting_ray(fake_bundle, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(fake_bundle), *args])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_missing_bundle(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path / "nope")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("address", ["auto", "ray://127.0.0.1:{port}"])
def test_joining_a_cluster_nobody_runs_fails_fast(fake_bundle, tmp_path, capsys, monkeypatch, address):
    """`ray.init` would wait for minutes on an address where no Ray answers (`auto` finds one after a cluster
    was stopped without `ray stop`, or in RAY_ADDRESS): refused before Ray is asked, exit 2."""
    ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # what `auto` finds first
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(fake_bundle), "--address", address.format(port=port), "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and time.monotonic() - t0 < 10
    assert f"nothing answers at 127.0.0.1:{port}" in err and "ray start --head" in err, err
