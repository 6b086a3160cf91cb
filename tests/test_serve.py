"""`osx serve` on a real local Ray (2 CPUs, loopback only): two replicas of the tiny bundle behind the
HTTP API. One Ray instance and one deployment for the whole module; every wait is bounded."""

import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from osx.cli import main
from test_serve_references import png

ray = pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
serve = pytest.importorskip("ray.serve", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")

FINAL = ("succeeded", "failed", "cancelled")
LONG = 150  # steps: several seconds on the tiny bundle, long enough to act on a job mid-run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, base: str):
        self.base = base

    def call(self, method: str, path: str, body=None, raw: bytes | None = None):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, r.read(), r.headers
        except urllib.error.HTTPError as e:
            return e.code, e.read(), e.headers

    def json(self, method: str, path: str, body=None, raw=None):
        status, data, _ = self.call(method, path, body, raw)
        return status, json.loads(data)

    def wait(self, job_id: str, until=None, timeout: float = 120.0) -> dict:
        deadline, final = time.monotonic() + timeout, until is None
        until = until or (lambda s: s["state"] in FINAL)
        while time.monotonic() < deadline:  # waiting for the end: long polls (?wait=), else every 0.1 s
            code, status = self.json("GET", f"/v1/videos/{job_id}" + ("?wait=5" if final else ""))
            assert code == 200, status
            if until(status):
                return status
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not get there in {timeout} s: {status}")


@pytest.fixture(scope="module")
def service(tiny_bundle, tmp_path_factory):
    from osx.runtime.serving.app import deploy, start_local_ray

    port = _free_port()
    direct = start_local_ray(2, direct=("127.0.0.1", port), object_store_memory=80 * 2**20)
    try:
        store = tmp_path_factory.mktemp("serve-store")
        deploy([tiny_bundle], store=str(store), replicas=2, queue=2, max_steps=LONG,
               port=port, verify=False, direct_ingress=direct)
        client = Client(f"http://127.0.0.1:{port}")
        client.store = store
        yield client
    finally:
        serve.shutdown()
        ray.shutdown()


def test_replicas_run_at_the_priority_of_the_process_that_started_ray(service):
    """Ray's default starts workers 15 nice levels lower: a replica then got the CPU last under any load."""
    import os

    assert ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote(), timeout=60) == os.nice(0)  # both CPUs are the replicas'


def _cli_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_models_health_and_page(service, tiny_bundle):
    code, health = service.json("GET", "/healthz")
    assert code == 200 and health["models"] == ["tiny"]
    code, models = service.json("GET", "/v1/models")
    (m,) = models["models"]
    assert m["model"] == "opensora-v1.2-tiny" and m["replicas"] == "2" and m["queue_limit"] == 6
    assert m["limits"]["frames"] == [[1, 1], [17, 51]] and m["limits"]["steps"] == [1, LONG]
    assert m["defaults"]["steps"] == 10
    code, page, headers = service.call("GET", "/")
    assert code == 200 and b"<video" in page and headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("fields, cli_args", [
    ({"num_frames": 5}, ["--frames", "5"]),
    ({"width": 4000}, ["--resolution", "4000x64"]),
    ({"steps": 0}, ["--steps", "0"]),
])
def test_bad_input_is_400_with_the_cli_message(service, tiny_bundle, tmp_path, capsys, fields, cli_args):
    code, body = service.json("POST", "/v1/videos", {"prompt": "a fox", **fields})
    err = _cli_error(capsys, "generate", str(tiny_bundle.resolve()), "--prompt", "a fox", "--out", str(tmp_path / "x.mp4"), *cli_args)
    assert code == 400
    assert err == f"error: {body['error']}\n  hint: {body['hint']}\n" if body["hint"] else f"error: {body['error']}\n"


def test_malformed_requests(service):
    cases = [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"prompt": "x", "sed": 1}).encode(), "unknown fields ['sed']"),
        (json.dumps({"prompt": "x", "seed": "7"}).encode(), "'seed' must be an integer"),
        (json.dumps({"seed": 7}).encode(), "prompt is required"),
        (json.dumps({"prompt": "x", "model": "nope"}).encode(), "unknown model 'nope'"),
        (json.dumps({"prompt": "x", "steps": LONG + 1}).encode(), f"at most {LONG}"),
        (b"[" * 100000, "not valid JSON"),  # nested past Python's recursion limit
    ]
    for raw, message in cases:
        code, body = service.json("POST", "/v1/videos", raw=raw[:60000])
        assert code == 400 and message in body["error"], (raw[:40], body)
    from osx.runtime.serving.app import MAX_BODY

    code, body = service.json("POST", "/v1/videos", raw=b" " * (MAX_BODY + 1))
    assert code == 413
    for path in ("/v1/videos/vid_000000000000000000000000", "/v1/videos/..%2F..%2Fetc", "/v1/videos/x/content"):
        assert service.call("GET", path)[0] == 404
    assert service.call("DELETE", "/v1/videos/vid_000000000000000000000000")[0] == 404


def _decoded(data: bytes, tmp) -> np.ndarray:
    import av

    path = tmp / f"{hash(data)}.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]).astype(np.float64)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


def test_six_concurrent_requests_equal_osx_generate(service, tiny_bundle, tmp_path, capsys):
    """Six requests at once over two replicas; each mp4 is byte-identical to `osx generate`'s with the same
    seed (and, decoded, far from every other seed's: the request really reached the pipeline)."""
    seeds = [11, 12, 13, 14, 15, 16]
    ids = {}

    def submit(seed):
        code, body = service.json("POST", "/v1/videos", {"prompt": "a red fox in the snow", "seed": seed, "steps": 4})
        assert code == 202, body
        ids[seed] = body["id"]

    threads = [threading.Thread(target=submit, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    served, replicas = {}, set()
    for seed in seeds:
        if seed % 2:  # content?wait=S answers with the mp4 once the job is final: one request, no polling
            code, data, headers = service.call("GET", f"/v1/videos/{ids[seed]}/content?wait=25")
            status = service.json("GET", f"/v1/videos/{ids[seed]}")[1]
        else:
            status = service.wait(ids[seed])
            code, data, headers = service.call("GET", f"/v1/videos/{ids[seed]}/content")
        assert status["state"] == "succeeded", status
        assert status["progress"]["fraction"] == 1.0 and status["result"]["seed"] == seed
        replicas.add(status["replica"])
        assert code == 200 and headers["Content-Type"] == "video/mp4"
        out = tmp_path / f"cli-{seed}.mp4"
        main(["generate", str(tiny_bundle), "--prompt", "a red fox in the snow", "--seed", str(seed), "--steps", "4",
              "--out", str(out), "--no-verify"])
        assert data == out.read_bytes(), seed
        served[seed] = _decoded(data, tmp_path)
        assert served[seed].shape == (34, 64, 64, 3)
    for seed in seeds:
        for other in set(seeds) - {seed}:
            assert _psnr(served[seed], served[other]) < 22, (seed, other)  # neighbouring seeds measured 17.3 dB
    assert len(replicas) == 2, "both replicas should have taken work"
    capsys.readouterr()


def test_a_reference_image_travels_in_the_request(service, tiny_bundle, tmp_path, capsys):
    """i2v over HTTP: the image's bytes in base64 (never a server path); the mp4 is `osx generate --image`'s."""
    import base64

    import cv2

    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    fields = {"prompt": "a red fox", "seed": 5, "steps": 2, "num_frames": 17, "condition": "loop"}
    code, body = service.json("POST", "/v1/videos", {**fields, "image": base64.b64encode(png).decode()})
    assert code == 202, body
    status = service.wait(body["id"])
    assert status["state"] == "succeeded", status
    assert status["request"]["image"] == f"({len(png)} bytes)"  # the record keeps no upload
    (tmp_path / "ref.png").write_bytes(png)
    main(["generate", str(tiny_bundle), "--prompt", "a red fox", "--seed", "5", "--steps", "2", "--frames", "17",
          "--image", str(tmp_path / "ref.png"), "--condition", "loop", "--out", str(tmp_path / "cli.mp4"), "--no-verify"])
    assert service.call("GET", f"/v1/videos/{body['id']}/content")[1] == (tmp_path / "cli.mp4").read_bytes()
    for bad, message in [({"image": str(tmp_path / "ref.png")}, "not base64"),
                         ({"image": base64.b64encode(b"not a picture").decode()}, "not a readable image"),
                         # the pipeline's own checks at submission: a 400, not a job that fails
                         ({"video": base64.b64encode(b"not a video").decode(), "condition": "head"}, "the uploaded video is not a readable video"),
                         ({"image": base64.b64encode(png).decode(), "condition": "middle"}, "condition 'middle' is not one of")]:
        code, body = service.json("POST", "/v1/videos", {**fields, **bad})
        assert code == 400 and message in body["error"], body
    assert service.json("GET", "/healthz")[1]["open_jobs"] == {"tiny": 0}  # nothing was queued
    capsys.readouterr()


def test_full_queue_gets_429_and_cancel_stops_jobs(service):
    ids = []
    for seed in range(6):  # capacity: 2 replicas x (1 running + 2 queued)
        code, body = service.json("POST", "/v1/videos", {"prompt": "slow", "seed": seed, "steps": LONG})
        assert code == 202, body
        ids.append(body["id"])
    code, body, headers = service.call("POST", "/v1/videos", {"prompt": "one too many", "steps": 2})
    assert code == 429 and int(headers["Retry-After"]) >= 1 and b"queue full" in body
    running = service.wait(ids[0], until=lambda s: s["state"] == "running" and (s["progress"] or {}).get("phase") == "denoise")
    for job_id in ids:
        code, body = service.json("DELETE", f"/v1/videos/{job_id}")
        assert code in (200, 202), body  # 200: it had already finished and is now deleted
    for job_id in ids:
        code, status = service.json("GET", f"/v1/videos/{job_id}")
        if code == 200:
            status = service.wait(job_id)
            assert status["state"] == "cancelled", status
    first = service.wait(ids[0])
    assert first["progress"]["step"] < LONG and "cancelled during denoise" in first["error"], (running, first)
    assert service.call("GET", f"/v1/videos/{ids[0]}/content")[0] == 409
    # nothing else broke: the next request runs
    code, body = service.json("POST", "/v1/videos", {"prompt": "after the rush", "steps": 2})
    assert code == 202 and service.wait(body["id"])["state"] == "succeeded"
    assert service.json("DELETE", f"/v1/videos/{body['id']}")[1] == {"id": body["id"], "deleted": True}
    assert service.call("GET", f"/v1/videos/{body['id']}")[0] == 404


def test_killed_replica_ends_the_job_and_service_goes_on(service):
    code, body = service.json("POST", "/v1/videos", {"prompt": "doomed replica", "steps": LONG})
    assert code == 202
    running = service.wait(body["id"], until=lambda s: s["state"] == "running" and (s["progress"] or {}).get("step", 0) >= 2
                           and s["progress"]["phase"] == "denoise")
    ray.kill(ray.get_actor(running["replica"], namespace="serve"))
    final = service.wait(body["id"], timeout=180)
    assert final["state"] in ("succeeded", "failed"), final
    if final["state"] == "succeeded":  # retried once on another replica
        assert final["attempt"] == 2 and final["replica"] != running["replica"] and final["error"] is None
        assert "ActorDiedError" in final["retried_because"]
    else:
        assert "replica stopped" in final["error"]
    code, body = service.json("POST", "/v1/videos", {"prompt": "next one", "steps": 2})
    assert code == 202 and service.wait(body["id"], timeout=180)["state"] == "succeeded"


def _browser():
    """Debian's chromium, headless, driven through its own chromedriver (nothing downloaded)."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium comes with the `test` extra")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--mute-audio",
                "--autoplay-policy=no-user-gesture-required"):
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_page_load_timeout(30)
    browser.set_script_timeout(30)
    return browser


def test_web_page_generates_and_plays_the_video(service, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _browser()
    try:
        browser.get(service.base + "/")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "steps").get_attribute("value") == "10")
        assert browser.find_element(By.ID, "num_frames").get_attribute("max") == "51"
        assert "frames 1, 17..51" in browser.find_element(By.ID, "supported").text
        # a bad request shows the server's words
        frames = browser.find_element(By.ID, "num_frames")
        frames.clear()
        frames.send_keys("5")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "error").text)
        assert "5 frames: outside what this bundle supports" in browser.find_element(By.ID, "error").text
        # a good one: progress to 100 %, then the video plays
        frames.clear()
        frames.send_keys("51")
        steps = browser.find_element(By.ID, "steps")
        steps.clear()
        steps.send_keys(str(LONG))  # ~1.6 s here: several of the page's 0.4 s polls (34 frames x 40 steps once ended within two)
        browser.find_element(By.ID, "prompt").send_keys("a fox in a browser")
        browser.find_element(By.ID, "submit").click()
        seen, deadline = set(), time.monotonic() + 120
        while time.monotonic() < deadline and 100 not in seen:
            seen.add(int(browser.find_element(By.ID, "bar").get_attribute("value")))
            time.sleep(0.05)
        assert 100 in seen and len(seen) >= 3, seen  # it moved through values on its way
        assert browser.find_element(By.ID, "state").text == "succeeded" and browser.find_element(By.ID, "error").text == ""
        played = browser.execute_async_script("""
            const done = arguments[arguments.length - 1], v = document.getElementById('video');
            const report = () => done({duration: v.duration, time: v.currentTime, error: v.error && v.error.code});
            const go = () => v.play().then(() => setTimeout(report, 400), (e) => done({error: String(e)}));
            v.readyState >= 1 ? go() : v.addEventListener('loadedmetadata', go, {once: true});""")
        assert played.get("error") is None and played["duration"] > 1.0 and played["time"] > 0, played
        # a reference image: its conditions offered once chosen, sent base64 with the one picked (v1.2: no t2i2v)
        assert browser.find_element(By.ID, "t2i").get_attribute("hidden") is not None
        assert browser.find_element(By.ID, "condition").get_attribute("disabled") is not None
        reference = tmp_path / "reference.png"
        reference.write_bytes(png(seed=7))
        browser.find_element(By.ID, "reference").send_keys(str(reference))
        options = browser.find_elements(By.CSS_SELECTOR, "#condition option")
        assert [o.get_attribute("value") for o in options] == ["head", "tail", "loop"]
        options[1].click()
        steps.clear()
        steps.send_keys("2")
        browser.find_element(By.ID, "submit").click()
        WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "state").text in ("succeeded", "failed", "error"))
        assert browser.find_element(By.ID, "state").text == "succeeded", browser.find_element(By.ID, "error").text
        (kept,) = [p for p in service.store.glob("*/reference.image") if p.read_bytes() == reference.read_bytes()]
        (status,) = [json.loads(p.read_text()) for p in sorted(kept.parent.glob("status.*.json"))[-1:]]
        assert status["request"]["condition"] == "tail" and status["state"] == "succeeded", status
    finally:
        browser.quit()
