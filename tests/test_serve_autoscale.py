"""`osx serve --autoscale 1:2` on a real local Ray (2 CPUs, loopback only): a small load makes Ray Serve add
the second replica, and every job still ends (the backlog cancelled once it has done its job). Its own Ray instance;
every wait is bounded (under a minute here, at most 5)."""

import time

import pytest

ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")

from test_serve import Client, _free_port  # noqa: E402 - after the importorskip

STEPS = 300  # a few seconds a job on the tiny bundle


def _running_replicas(model: str) -> int:
    from osx.runtime.serving.app import generator_name

    states = serve.status().applications["osx"].deployments[generator_name(model)].replica_states
    return states.get("RUNNING", 0)


@pytest.mark.slow
def test_autoscale_adds_a_replica_under_load_and_every_job_ends(tiny_bundle, tmp_path):
    from osx.runtime.serving.app import deploy, start_local_ray

    port = _free_port()
    direct = start_local_ray(2, direct=("127.0.0.1", port), object_store_memory=80 * 2**20)
    try:
        deploy([tiny_bundle], store=str(tmp_path / "store"), autoscale=(1, 2), queue=4, max_steps=STEPS, port=port, verify=False, direct_ingress=direct)
        client = Client(f"http://127.0.0.1:{port}")
        assert _running_replicas("tiny") == 1
        ids, seed, t0 = [], 0, time.monotonic()

        def submit() -> str | None:
            nonlocal seed
            code, body = client.json("POST", "/v1/videos", {"prompt": "load", "seed": seed, "steps": STEPS})
            assert code in (202, 429), body  # 429: the queue is full, which is the load we want
            seed += code == 202
            return body["id"] if code == 202 else None

        # Keep the queue full until Ray Serve adds the second replica (however fast the jobs run here).
        while time.monotonic() < t0 + 90 and _running_replicas("tiny") < 2:
            ids += filter(None, [submit()])
            time.sleep(0.5)
        assert _running_replicas("tiny") == 2, f"no second replica within 90 s ({len(ids)} jobs submitted)"
        print(f"second replica running {time.monotonic() - t0:.1f} s after the load began, {len(ids)} jobs in")
        # The backlog has done its job: cancel it (a job that already finished is deleted instead), so the
        # test does not wait for ~20 jobs; each still ends, as cancelled or succeeded.
        for job_id in ids:
            code, body = client.json("DELETE", f"/v1/videos/{job_id}")
            assert code in (200, 202), body
        early = [client.wait(job_id, timeout=120) for job_id in ids if client.call("GET", f"/v1/videos/{job_id}")[0] == 200]
        assert {s["state"] for s in early} <= {"succeeded", "cancelled"}, early
        late = []  # both replicas are up and idle now: Serve routes to the less busy one
        while len(late) < 4 and time.monotonic() < t0 + 150:
            late += filter(None, [submit()])
            time.sleep(0.1)
        assert len(late) == 4
        finals = [client.wait(job_id, timeout=240) for job_id in late]
        print(f"{len(early)} early jobs cancelled or done, 4 late ones ended {time.monotonic() - t0:.1f} s after the load began")
        assert [s["state"] for s in finals] == ["succeeded"] * len(finals), finals
        assert len({s["replica"] for s in finals}) == 2, "the second replica took none of the new jobs"
        assert _running_replicas("tiny") <= 2
    finally:
        serve.shutdown()
        ray.shutdown()
