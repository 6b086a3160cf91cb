"""`osx serve` with an Open-Sora v2.0 bundle on a real local Ray (2 CPUs, loopback only): the tiny v2.0 bundle
exported with Flux.1-dev (`tiny_t2i_bundle`, shared with the t2i2v tests), one replica. Text-to-video and
text -> image -> video (`t2i2v`) requests each give the mp4 of `Pipeline.generate` with the same options; the
image loop's steps are bounded by --max-steps like the video's. Every wait is bounded."""

import pytest

ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")

from test_serve import Client, _browser, _free_port  # noqa: E402 - after the importorskip
from test_serve_references import png  # noqa: E402

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
        client.store = tmp_path / "store"
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
        _page_sends_t2i2v(client, tmp_path)
    finally:
        serve.shutdown()
        ray.shutdown()


def _page_sends_t2i2v(client, tmp_path):
    """The web page on a t2i2v bundle: the t2i2v box on by default, off and locked once a reference is chosen
    (v2.0's image conditions offered), and a request sent with it on and the image steps asked for."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(client.base + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "t2i").get_attribute("hidden") is None)
        box = browser.find_element(By.ID, "t2i2v")
        assert box.is_selected() and box.is_enabled()
        (tmp_path / "ref.png").write_bytes(png())
        browser.find_element(By.ID, "reference").send_keys(str(tmp_path / "ref.png"))
        assert [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#condition option")] == ["head", "tail", "loop"]
        assert not box.is_selected() and not box.is_enabled()
        browser.find_element(By.ID, "reference").clear()
        browser.execute_script("document.getElementById('reference').dispatchEvent(new Event('change'))")
        assert box.is_selected() and box.is_enabled()
        for field, value in (("steps", "2"), ("t2i_steps", "2"), ("seed", "11")):
            browser.find_element(By.ID, field).clear()
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 180).until(lambda b: b.find_element(By.ID, "state").text in ("succeeded", "failed", "error"))
        assert browser.find_element(By.ID, "state").text == "succeeded", browser.find_element(By.ID, "error").text
    finally:
        browser.quit()
    jobs = [sorted(job.glob("status.*.json"))[-1] for job in client.store.iterdir() if job.is_dir()]
    (request,) = [r for r in (json.loads(p.read_text())["request"] for p in jobs) if r.get("seed") == 11]
    assert request["t2i2v"] is True and request["t2i_steps"] == 2 and request["steps"] == 2, request
