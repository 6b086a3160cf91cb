"""`osx serve --autoscale 1:2` on a real local Ray (2 CPUs, loopback only): a small load makes Ray Serve add
the second replica, and every job still ends. Its own Ray instance; every wait is bounded (~1-2 minutes here, at most 5)."""

import time

import pytest

ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")

from test_serve import Client, _free_port  # noqa: E402 - after the importorskip

STEPS = 300  # a few seconds a job on the tiny bundle: 8 of them outlast the second replica's start


def _running_replicas(app: str) -> int:
    states = serve.status().applications[app].deployments["Generator"].replica_states
    return states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscale_adds_a_replica_under_load_and_every_job_ends(tiny_bundle, tmp_path):
    from osx.runtime.serving.app import deploy, start_local_ray

    port = _free_port()
    start_local_ray(2, object_store_memory=80 * 2**20)
    try:
        deploy([tiny_bundle], store=str(tmp_path / "store"), autoscale=(1, 2), queue=4, max_steps=STEPS, port=port, verify=False)
        client = Client(f"http://127.0.0.1:{port}")
        assert _running_replicas("tiny") == 1
        ids = []
        for seed in range(8):  # about a minute of work for one replica
            code, body = client.json("POST", "/v1/videos", {"prompt": "load", "seed": seed, "steps": STEPS})
            assert code == 202, body
            ids.append(body["id"])
        seen, t0 = [], time.monotonic()
        while time.monotonic() < t0 + 90 and max(seen, default=0) < 2:
            seen.append(_running_replicas("tiny"))
            time.sleep(0.5)
        assert max(seen) == 2, f"no second replica within 90 s: {seen[-5:]}"
        print(f"second replica running {time.monotonic() - t0:.1f} s after the load began")
        finals = [client.wait(job_id, timeout=240) for job_id in ids]
        print(f"all jobs ended {time.monotonic() - t0:.1f} s after the load began")
        assert [s["state"] for s in finals] == ["succeeded"] * 8, finals
        assert len({s["replica"] for s in finals}) == 2, "the second replica took none of the queued jobs"
        assert _running_replicas("tiny") <= 2
    finally:
        serve.shutdown()
        ray.shutdown()
