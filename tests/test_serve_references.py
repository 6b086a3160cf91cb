"""References in `osx serve` requests (runtime/serving/references.py) and replicas that keep their components
loaded: a replica's job handler (`Generator._generate`, what `generate` runs on the replica's own thread) runs
here, without a Ray cluster, on a preloaded Pipeline of the tiny bundle whose backends count their loads."""

import base64

import numpy as np
import pytest

from osx.errors import BundleError, InputError
from osx.runtime.pipeline import Pipeline

pytest.importorskip("ray", reason="osx serve needs the `serve` extra (pip install -e '.[serve]')")
from osx.runtime.serving import references  # noqa: E402
from osx.runtime.serving.jobs import JobStore  # noqa: E402

PROMPT = "A lighthouse on a cliff, waves below."


def png(h=48, w=80, seed=0) -> bytes:
    import cv2

    rng = np.random.default_rng(seed)
    return cv2.imencode(".png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))[1].tobytes()


def start_replica(bundle, store):
    """(a Generator replica as `osx serve` starts one, {component: times loaded})."""
    from osx.runtime.serving.app import Generator

    pipe = Pipeline.load(bundle, verify=False)
    loads = dict.fromkeys(pipe.backends, 0)
    for name, backend in pipe.backends.items():
        def counted(load=backend.load, name=name):
            loads[name] += 1
            return load()
        backend.load = counted
    replica = object.__new__(Generator.func_or_class)  # what __init__ does, less Ray's actor name
    replica.pipeline, replica.store, replica.replica = pipe, JobStore(store).check(), "replica-1"
    pipe.preload()
    return replica, loads


@pytest.fixture
def replica(tiny_bundle, tmp_path):
    """A replica of the tiny bundle as planned for a GPU with room for every component (all resident)."""
    import dataclasses

    from osx.bundle import Bundle

    b = Bundle.open(tiny_bundle, verify=False)
    resident = Bundle(b.root, b.manifest.replace(runtime=dataclasses.replace(b.manifest.runtime, load_one_at_a_time=False)))
    return start_replica(resident, tmp_path / "store")


def submit(replica, fields: dict) -> tuple[str, dict]:
    """What the ingress does with a request: the upload decoded and kept in the job's folder."""
    upload = references.decode(fields, replica.pipeline)
    job = replica.store.create("tiny", fields)["id"]
    if upload is not None:
        fields = {**fields, upload[0]: str(references.keep(*upload, replica.store.root / job))}
    return job, fields


def test_image_requests_reuse_the_replicas_loaded_components(replica):
    """Two i2v jobs on one replica: every component loaded once (the VAE encoder at the first reference)."""
    replica, loads = replica
    assert set(loads) == {"text_encoder", "denoiser", "vae_decoder", "vae_encoder"}
    assert loads == {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1, "vae_encoder": 0}  # preloaded
    fields = {"prompt": PROMPT, "steps": 1, "num_frames": 17, "seed": 2, "image": base64.b64encode(png()).decode(),
              "condition": "tail"}
    for k in range(2):
        job, sent = submit(replica, {**fields, "seed": 2 + k})
        assert replica._generate(job, 1, sent) == "succeeded", replica.store.read(job)["error"]
        status = replica.store.read(job)
        assert status["result"]["frames"] == 17 and replica.store.video(job).stat().st_size > 0
        assert loads == {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1, "vae_encoder": 1}, k  # nothing reloaded
    # the served video is the direct run's: same reference, condition and seed
    from osx.runtime.video import write_video

    direct = Pipeline.load(replica.pipeline.bundle).generate(PROMPT, steps=1, num_frames=17, seed=3, condition="tail",
                                                             image=replica.store.root / job / "reference.image")
    mp4 = write_video(direct, replica.store.root / "direct.mp4", status["result"]["fps"])
    assert mp4.read_bytes() == replica.store.video(job).read_bytes()


def test_one_at_a_time_plans_load_each_component_once_per_request(tiny_bundle, tmp_path):
    """The CPU plan releases each component after its stage (its memory budget), so every request loads
    each one again: a reference adds the encoder's load, and nothing twice."""
    replica, loads = start_replica(tiny_bundle, tmp_path / "store")
    assert replica.pipeline.load_one_at_a_time
    fields = {"prompt": PROMPT, "steps": 1, "num_frames": 17, "image": base64.b64encode(png()).decode()}
    for k in range(1, 3):
        job, sent = submit(replica, fields)
        assert replica._generate(job, 1, sent) == "succeeded", replica.store.read(job)["error"]
        assert loads == {"text_encoder": 1 + k, "denoiser": 1 + k, "vae_decoder": 1 + k, "vae_encoder": k}


def test_a_data_url_and_a_data_video_are_accepted(replica, tmp_path):
    from osx.runtime.video import write_video

    replica, _ = replica
    kind, data = references.decode({"image": "data:image/png;base64," + base64.b64encode(png()).decode()}, replica.pipeline)
    assert kind == "image" and data == png()
    mp4 = write_video(np.stack([np.full((32, 32, 3), 10 * s, np.uint8) for s in range(17)]), tmp_path / "ref.mp4", 24)
    job, sent = submit(replica, {"prompt": PROMPT, "steps": 1, "num_frames": 34, "video": base64.b64encode(mp4.read_bytes()).decode()})
    assert replica._generate(job, 1, sent) == "succeeded", replica.store.read(job)["error"]
    assert replica.store.read(job)["result"]["frames"] == 34


def test_bad_uploads_are_refused_clearly(replica, tmp_path):
    replica, _ = replica
    pipe = replica.pipeline
    for fields, message in [({"image": "/etc/passwd"}, "not base64"), ({"image": ""}, "holds 0 bytes"),
                            ({"image": "aGk=", "video": "aGk="}, "both given")]:
        with pytest.raises(InputError, match=message):
            references.decode(fields, pipe)
    folder = tmp_path / "job"
    folder.mkdir()
    with pytest.raises(InputError, match="not a readable image"):
        references.keep("image", b"not an image", folder)
    assert list(folder.iterdir()) == []  # nothing left behind
    bare = Pipeline(pipe.bundle, {k: v for k, v in pipe.backends.items() if k != "vae_encoder"})
    with pytest.raises(BundleError, match="no VAE encoder"):
        references.decode({"image": base64.b64encode(png()).decode()}, bare)
    assert references.decode({"prompt": "x", "image": None}, pipe) is None



def test_references_are_checked_by_the_pipeline_before_any_encoding(tiny_bundle, tmp_path):
    """`references.check` (the ingress, at submission): the pipeline's own messages for a video that does not
    decode, a condition the family lacks, a video continued elsewhere than at the head; a good reference passes
    with nothing loaded or encoded."""
    from osx.runtime.video import write_video

    pipe = Pipeline.load(tiny_bundle, verify=False)
    request = pipe.prepare_request(PROMPT, steps=1, num_frames=17)
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "ref.png").write_bytes(png())
    good_video = write_video(np.zeros((17, 32, 32, 3), np.uint8), tmp_path / "ref.mp4", 24)
    for refs, message in [({"video": str(tmp_path / "broken.mp4")}, "the uploaded video is not a readable video"),
                          ({"image": str(tmp_path / "ref.png"), "condition": "middle"}, "condition 'middle' is not one of"),
                          ({"video": str(good_video), "condition": "tail"}, "a reference video is continued at the head")]:
        with pytest.raises(InputError, match=message):
            references.check(pipe, request, refs)
    with pytest.raises(InputError, match="extend"):
        references.check(pipe, request, {"video": str(good_video), "extend": 99})

    def encoded(*args, **kwargs):
        raise AssertionError("a check encoded the reference")

    pipe.encode_reference = encoded
    for refs in ({"image": str(tmp_path / "ref.png"), "condition": "tail"}, {"video": str(good_video)}, {}):
        references.check(pipe, request, refs)
    assert not any(b.loaded for b in pipe.backends.values())


def test_v2_references_are_checked_without_encoding(tiny_v2_bundle, tmp_path):
    """`PipelineV2.check_references` (what `references.check` runs for a v2.0 bundle): v2.0's own refusals (a
    condition of the other kind, extension, a video too short for its condition), a good reference passes
    with nothing loaded or encoded."""
    from osx.runtime.video import write_video

    pipe = Pipeline.load(tiny_v2_bundle, verify=False)
    request = pipe.prepare_request(PROMPT, steps=1)
    (tmp_path / "ref.png").write_bytes(png())
    short = write_video(np.zeros((5, 32, 32, 3), np.uint8), tmp_path / "short.mp4", 24)

    def encoded(*args, **kwargs):
        raise AssertionError("a check encoded the reference")

    pipe.encode_reference = encoded
    for refs, message in [({"image": str(tmp_path / "ref.png"), "condition": "head_half"}, "is not one of head, tail, loop"),
                          ({"image": str(tmp_path / "ref.png"), "extend": 1}, "extension .* is not available"),
                          ({"video": str(short)}, "needs a reference video of at least")]:
        with pytest.raises(InputError, match=message):
            references.check(pipe, request, refs)
    references.check(pipe, request, {"image": str(tmp_path / "ref.png"), "condition": "loop"})
    assert not any(b.loaded for b in pipe.backends.values())
