"""`osx serve` with an Open-Sora v2.0 bundle on a real local Ray (2 CPUs, loopback only): the tiny v2.0 bundle
exported with Flux.1-dev (`tiny_t2i_bundle`, shared with the t2i2v tests), one replica. Text-to-video and
text -> image -> video (`t2i2v`) requests each give the mp4 of `Pipeline.generate` with the same options; the
image loop's steps are bounded by --max-steps like the video's. Every wait is bounded."""

import pytest

ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")

from test_serve import Client, _free_port  # noqa: E402 - after the importorskip

from osx.models_v2 import T2I_CONFIGS  # noqa: E402
from osx.runtime.pipeline import Pipeline  # noqa: E402
from osx.runtime.video import resolve_codec, write_video  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk"
MAX_STEPS = 4  # below the tiny Flux's default 6 image steps: a t2i2v request must ask for fewer


@pytest.mark.slow  # its own Ray and deployment, four tiny v2.0 generations: ~30-40 s on 2 busy cores
def test_v2_bundle_served_with_and_without_t2i2v(tiny_t2i_bundle, tmp_path):
    from osx.runtime.serving.app import deploy, start_local_ray

    port = _free_port()
    direct = start_local_ray(2, direct=("127.0.0.1", port), object_store_memory=80 * 2**20)
    try:
        deploy([tiny_t2i_bundle], store=str(tmp_path / "store"), replicas=1, max_steps=MAX_STEPS, port=port, verify=False,
               direct_ingress=direct)
        client = Client(f"http://127.0.0.1:{port}")
        (model,) = client.json("GET", "/v1/models")[1]["models"]
        assert model["model"] == "opensora-v2.0-tiny" and model["t2i2v"] is True

        default = T2I_CONFIGS["opensora-v2.0-tiny"].num_steps
        code, body = client.json("POST", "/v1/videos", {"prompt": PROMPT, "steps": 2})  # t2i2v on by default
        assert code == 400 and body["error"] == f"t2i_steps={default}: this service allows at most {MAX_STEPS}", body
        code, body = client.json("POST", "/v1/videos", {"prompt": PROMPT, "t2i2v": "yes"})
        assert code == 400 and "'t2i2v' must be" in body["error"], body

        cases = {"t2v": {"t2i2v": False}, "t2i2v": {"t2i2v": True, "t2i_steps": 2}}
        ids = {}
        for name, fields in cases.items():
            code, body = client.json("POST", "/v1/videos", {"prompt": PROMPT, "seed": 5, "steps": 2, **fields})
            assert code == 202, body
            ids[name] = body["id"]
        pipe = Pipeline.load(tiny_t2i_bundle, verify=False)  # the same request in this process, written as the service writes it
        served = {}
        for name, fields in cases.items():
            status = client.wait(ids[name], timeout=180)
            assert status["state"] == "succeeded", status
            code, served[name], _ = client.call("GET", f"/v1/videos/{ids[name]}/content")
            out = tmp_path / f"{name}.mp4"
            write_video(pipe.generate(PROMPT, seed=5, steps=2, **fields), out, status["result"]["fps"], resolve_codec(out))
            assert code == 200 and served[name] == out.read_bytes(), name
        assert served["t2v"] != served["t2i2v"]  # the request's t2i2v reached the pipeline
    finally:
        serve.shutdown()
        ray.shutdown()
