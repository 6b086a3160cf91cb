"""The torch-free Open-Sora v2.0 pipeline (runtime/pipeline_v2.py) over the torch reference's own modules.

Each component backend here is the reference's torch module on NumPy arrays (a stand-in for the exported
graph), so this checks the runtime's own work against export/pipeline_v2.py's `reference_generate_v2`: the
prompt rows and token ids of both tokenizers, the text states, the sampler loop (rows, RoPE tables, timesteps,
guidance), the tiled VAE decode and the uint8 frames; then progress, cancelling, the request checks and the
refusals. The exported bundle on onnxruntime, with torch blocked: tests/test_runtime_v2_bundle.py.

Tolerance: none, every latent and frame equal. Both sides call the torch modules one batch row at a time
(torch's float32 matmuls round differently at another batch size, and the runtime runs the 2 passes t2v
needs where the reference runs 3), and the denoiser gets torch's RoPE tables after the runtime's are checked
within 1e-6 of them; the loop rounds every update to bf16, so any 1e-7 difference would show."""

import dataclasses
import threading

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.errors import BundleError, InputError
from osx.families import component_specs
from osx.manifest import ComponentEntry, Manifest
from osx.models_v2 import HUNYUAN_VAE, OPENSORA_V2_0_TINY as TINY
from osx.runtime.pipeline import GenerationCancelled, Pipeline
from osx.runtime.pipeline_v2 import PipelineV2, decode_tile_count
from osx.runtime.sampler_v2 import unpack
from osx.runtime.video import to_uint8_frames
from osx.vae_tiling import tiled_decode

torch = pytest.importorskip("torch")
from osx.export.mmdit import video_rope  # noqa: E402 (needs torch)
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]
PROMPT = "a red fox in the snow"


class TorchBackend:
    """A component backend running a torch module on NumPy arrays; records the inputs of every call."""

    load_one_at_a_time = None

    def __init__(self, name, spec, fn):
        self.name, self.spec, self.fn, self.calls, self.loaded = name, spec, fn, [], False

    def load(self):
        self.loaded = True

    def release(self):
        self.loaded = False

    def limits(self):
        return [self.spec.dims]

    def buckets(self):
        return []

    @torch.no_grad()
    def run(self, inputs):
        """One batch row at a time (as `row_by_row` runs the reference), so the batch size never changes the
        arithmetic."""
        self.calls.append({k: np.array(v) for k, v in inputs.items()})
        args = [torch.from_numpy(np.ascontiguousarray(inputs[t.name])) for t in self.spec.inputs]
        batched = [t.shape[0] == "batch" for t in self.spec.inputs]
        rows = len(args[0])
        out = torch.cat([self.fn(*(a[i:i + 1] if b else a for a, b in zip(args, batched))) for i in range(rows)])
        return {self.spec.outputs[0].name: out.float().numpy()}


class RowByRow:
    """A reference module called one batch row at a time (the MMDiT's config and weights still reachable)."""

    def __init__(self, module, batched=None):
        self.module, self.cfg, self.img_in = module, getattr(module, "cfg", None), getattr(module, "img_in", None)
        self.batched = batched  # which arguments carry the batch (default: all)

    def __call__(self, *args):
        batched = self.batched or [True] * len(args)
        return torch.cat([self.module(*(a[i:i + 1] if b else a for a, b in zip(args, batched))) for i in range(len(args[0]))])


@pytest.fixture(scope="module")
def reference():
    from osx.export.pipeline_v2 import build_reference_v2

    return build_reference_v2(TINY, dtype=torch.float32)


@pytest.fixture(scope="module")
def row_by_row(reference):
    """The reference model with its text encoders and MMDiT called one row at a time."""
    return dataclasses.replace(reference, t5=RowByRow(reference.t5), clip=RowByRow(reference.clip),
                               mmdit=RowByRow(reference.mmdit, batched=[True] * 5 + [False, False]))


class MMDiTOnImageTables:
    """The MMDiT taking the image tokens' RoPE tables, as the exported graph does (it adds the text rows).
    With `grid` (T, h, w in patches) set to the run's: NumPy's cos/sin (osx.models_v2.rope_tables, float64
    then rounded) are checked within 1e-6 of torch's float32 ones, which are then used (the two differ in the
    last bit now and then), so the run stays bit-comparable with the reference."""

    def __init__(self, mmdit, L):
        self.mmdit, self.L, self.grid = mmdit, L, None

    def __call__(self, img, txt, t, y, cond, cos, sin):
        if self.grid and np.prod(self.grid) == cos.shape[0]:
            want_cos, want_sin = video_rope(TINY.mmdit, self.L, *self.grid)
            assert torch.allclose(cos, want_cos[0, self.L:], rtol=0, atol=1e-6)
            assert torch.allclose(sin, want_sin[0, self.L:], rtol=0, atol=1e-6)
            return self.mmdit(img, txt, t, y, cond, want_cos, want_sin)
        ones, zeros = torch.ones(self.L, cos.shape[1]), torch.zeros(self.L, sin.shape[1])
        return self.mmdit(img, txt, t, y, cond, torch.cat([ones, cos])[None], torch.cat([zeros, sin])[None])


@pytest.fixture(scope="module")
def v2_bundle(reference, tmp_path_factory):
    """A bundle folder of the tiny model holding its manifest's typed contents and both tokenizers (no graphs:
    the backends are the torch modules)."""
    return torch_bundle(reference, tmp_path_factory.mktemp("v2-torch"))


def torch_bundle(reference, root, cfg=TINY):
    """The manifest and tokenizers of `v2_bundle` in `root`, for the tiny model or a variant `cfg` of it."""
    reference.t5_tokenizer.save(str(root / "tokenizer.json"))
    reference.clip_tokenizer.save(str(root / "clip_tokenizer.json"))
    specs = component_specs(cfg)
    manifest = Manifest(model={"name": cfg.name, "family": cfg.family, "config": cfg.to_dict()},
                        components={n: ComponentEntry(file=f"{n}.onnx", precision="fp32", io=s) for n, s in specs.items()},
                        tokenizer={"file": "tokenizer.json", "max_length": cfg.t5.max_length, "encoders": {
                            "text_encoder": {"file": "tokenizer.json", "max_length": cfg.t5.max_length},
                            "clip": {"file": "clip_tokenizer.json", "max_length": cfg.clip.max_length, "pad_token": "<|endoftext|>"}}},
                        scheduler=dataclasses.asdict(cfg.sampler))
    return Bundle(root, manifest)


def torch_pipeline(bundle, reference, cfg_batching=True):
    specs, L = {n: c.io for n, c in bundle.manifest.components.items()}, TINY.t5.max_length
    fns = {"text_encoder": lambda ids: reference.t5(ids, torch.ones_like(ids)), "clip": reference.clip,
           "denoiser": MMDiTOnImageTables(reference.mmdit, L), "vae_decoder": reference.vae.decode_tile}
    if not cfg_batching:
        bundle = Bundle(bundle.root, bundle.manifest.replace(runtime=dataclasses.replace(bundle.manifest.runtime, cfg_batching=False)))
    return PipelineV2(bundle, {n: TorchBackend(n, specs[n], fn) for n, fn in fns.items()})


@pytest.fixture(scope="module")
def pipe(v2_bundle, reference):
    return torch_pipeline(v2_bundle, reference)


def latents_of_a_run(pipe, request, noise=None):
    """(latent after every step, frames) of one run: the latent after step i is what step i + 1 feeds the
    denoiser (its first rows, packed); the last is what the run returns."""
    txt, y_vec = pipe.encode_text(request)
    calls = pipe.backends["denoiser"].calls
    start = len(calls)
    _, _, T, h, w = pipe.latent_shape(request)
    pipe.backends["denoiser"].fn.grid = (T, h // 2, w // 2)
    latent = pipe.denoise(request, txt, y_vec, noise)
    per_step = (len(calls) - start) // request.steps  # denoiser calls per step (1, or one per pass)
    latents = [unpack(c["img"][:1], T, h // 2, w // 2) for c in calls[start + per_step::per_step]] + [latent]
    return latents, to_uint8_frames(pipe.decode(latent, request.num_frames))


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kw", [{}, {"resolution": "96px", "aspect_ratio": "1:1", "num_frames": 5, "negative_prompt": "blurry",
                                     "seed": 3, "steps": 6}], ids=["64px-1:1-9f", "96px-tiled-5f"])
def test_runtime_loop_equals_the_torch_reference(pipe, row_by_row, kw):
    from osx.export.pipeline_v2 import reference_generate_v2

    request = pipe.prepare_request(PROMPT, **kw)
    latents, frames = latents_of_a_run(pipe, request)
    want = reference_generate_v2(row_by_row, PROMPT, height=request.height, width=request.width, num_frames=request.num_frames,
                                 num_steps=request.steps, seed=request.seed, negative_prompt=kw.get("negative_prompt"))
    # text: the rows, their token ids (T5 and CLIP), the states
    assert pipe.text_rows(request) == [want.prompt, want.negative_prompt]
    t5, clip = (pipe.backends[n].calls[-1]["input_ids"] for n in ("text_encoder", "clip"))
    assert np.array_equal(t5, want.t5_ids[:2]) and np.array_equal(clip, want.clip_ids[:2])
    txt, y_vec = pipe.encode_text(request)
    assert np.array_equal(txt, want.txt[:2]) and np.array_equal(y_vec, want.y_vec[:2])
    # every latent, then the frames
    assert len(latents) == len(want.latents) == request.steps
    for i, (a, b) in enumerate(zip(latents, want.latents)):
        assert np.array_equal(a, b), f"step {i + 1}: {rel(a, b):.2e} relative"
    assert frames.shape == want.frames.shape == (request.num_frames, request.height, request.width, 3)
    assert np.array_equal(frames, want.frames)
    if request.height > 64:  # 96 px: four overlapping 64 px tiles
        assert len(pipe.backends["vae_decoder"].calls[-4:]) == 4 == decode_tile_count(TINY.vae, latents[-1].shape)
    # the whole run through the public entry equals the stages
    assert np.array_equal(pipe.generate(PROMPT, **kw), frames)


def test_guidance_passes_share_a_call_or_take_one_each(v2_bundle, reference):
    """t2v: 2 rows per step (the third pass equals the second); without cfg batching, one row per call."""
    batched, single = torch_pipeline(v2_bundle, reference), torch_pipeline(v2_bundle, reference, cfg_batching=False)
    request = batched.prepare_request(PROMPT, steps=3)
    a, _ = latents_of_a_run(batched, request)
    b, _ = latents_of_a_run(single, request)
    assert [c["img"].shape[0] for c in batched.backends["denoiser"].calls] == [2] * 3
    assert [c["img"].shape[0] for c in single.backends["denoiser"].calls] == [1] * 6
    assert len(a) == len(b) == 3 and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_progress_events_and_cancelling(pipe):
    events = []
    frames = pipe.generate(PROMPT, steps=3, progress=events.append)
    assert frames.shape == (9, 64, 64, 3)
    assert [(e["phase"], e["step"], e["total"]) for e in events] == [
        ("text_encoder", 1, 2), ("text_encoder", 2, 2), ("denoise", 1, 3), ("denoise", 2, 3), ("denoise", 3, 3), ("vae_decode", 1, 1)]
    announced = pipe.progress_phases(pipe.prepare_request(PROMPT, steps=3))  # what osx serve weighs its fraction by
    assert [(p, n) for p, n in announced for _ in range(n)] == [(e["phase"], e["total"]) for e in events]
    assert set(pipe.timings) >= {"text_encoder_s", "denoise_s", "steps", "vae_decode_s", "total_s"} and len(pipe.timings["steps"]) == 3

    calls = pipe.backends["denoiser"].calls
    n = len(calls)
    with pytest.raises(GenerationCancelled, match="denoise after step 2 of 5"):
        pipe.generate(PROMPT, steps=5, progress=lambda e: not (e["phase"] == "denoise" and e["step"] == 2))
    assert len(calls) == n + 2  # stopped between two steps

    def cancel_at_first_step(e):
        if e["phase"] == "denoise":
            threading.Thread(target=pipe.cancel).start()
            threading.Event().wait(0.2)
    with pytest.raises(GenerationCancelled):
        pipe.generate(PROMPT, steps=5, progress=cancel_at_first_step)
    assert pipe.generate(PROMPT, steps=1).shape == (9, 64, 64, 3)  # a cancel does not stick to the next run


def test_a_nan_from_the_denoiser_stops_the_run_at_its_step(pipe, monkeypatch):
    """The pipeline checks each denoiser output (the sampler then looks for no NaN itself): a NaN or an inf
    stops the run with the step named, before any frame is written."""
    from osx.errors import OsxError

    denoiser, real_run, calls = pipe.backends["denoiser"], pipe.backends["denoiser"].run, []

    def run(inputs):
        out = real_run(inputs)
        calls.append(1)
        return {k: v * np.float32([np.nan, np.inf][len(calls) % 2]) for k, v in out.items()} if len(calls) >= 2 else out
    monkeypatch.setattr(denoiser, "run", run)
    with pytest.raises(OsxError, match="denoiser's output at step 2 of 3 holds NaN or infinite values"):
        pipe.generate(PROMPT, steps=3)
    assert len(calls) == 2


def test_request_defaults_and_sizes(pipe):
    r = pipe.prepare_request(PROMPT)
    assert (r.height, r.width, r.num_frames, r.steps, r.fps, r.seed, r.guidance_scale) == (64, 64, 9, 12, 24, 42, 7.5)
    assert (r.resolution, r.aspect_ratio) == ("64px", "1:1")
    r = pipe.prepare_request(PROMPT, resolution="96px", aspect_ratio="16:9", num_frames=33)
    assert (r.height, r.width, r.num_frames) == (64, 128, 33)
    r = pipe.prepare_request(PROMPT, height=64, width=128)  # a bucket's size, as the shim passes it
    assert (r.resolution, r.aspect_ratio) == ("96px", "16:9")
    assert "64px 1:1 = 64x64 (WxH)" in pipe.supported() and "frames 1, 5, ..., 33 (4k+1)" in pipe.supported()
    assert pipe.text_rows(pipe.prepare_request("raining, sea", fps=16)) == ["raining, sea. 16 FPS. 4 motion score.", ""]


@pytest.mark.parametrize("kw,message", [
    ({"num_frames": 6}, "num_frames=6: opensora-v2.0-tiny takes 4k\\+1 frames from 1 to 33"),
    ({"num_frames": 37}, "num_frames=37"),
    ({"height": 64, "width": 100}, "100x64 \\(WxH\\) is not one of opensora-v2.0-tiny's sizes"),
    ({"height": 64}, "give both height and width"),
    ({"height": 64, "width": 64, "resolution": "64px"}, "not both"),
    ({"resolution": "256px"}, "unknown resolution '256px'"),
    ({"aspect_ratio": "wide"}, "aspect ratio 'wide' is not W:H"),
    ({"steps": 0}, "steps=0 is outside 1..1000"),
    ({"guidance_scale": float("nan")}, "guidance scale=nan"),
    ({"seed": -1}, "seed=-1"),
    ({"fps": 0}, "fps=0"),
])
def test_bad_requests_are_refused_before_any_work(pipe, kw, message):
    n = len(pipe.backends["text_encoder"].calls)
    with pytest.raises(InputError, match=message):
        pipe.prepare_request(PROMPT, **kw)
    assert len(pipe.backends["text_encoder"].calls) == n


def test_image_conditioning_without_the_vae_encoder_is_refused_clearly(pipe):
    """References themselves: tests/test_image_to_video_v2.py (this pipeline has no VAE encoder backend)."""
    with pytest.raises(BundleError, match="no VAE encoder, which a reference image needs") as e:
        pipe.generate(PROMPT, steps=1, image=np.zeros((8, 8, 3), np.uint8))
    assert "--with-vae-encoder" in e.value.hint


def test_a_reference_dtype_this_osx_does_not_know_is_refused(v2_bundle, reference):
    bad = v2_bundle.manifest.replace(scheduler={**v2_bundle.manifest.scheduler, "reference_dtype": "fp16"})
    with pytest.raises(BundleError, match="reference dtype 'fp16' is not one of bf16, fp32"):
        torch_pipeline(Bundle(v2_bundle.root, bad), reference)


def test_each_pipeline_refuses_the_other_family(v2_bundle, reference, tiny_bundle):
    """A v2.0 bundle in v1.2's pipeline (what a v1.2-only reader such as the Triton model constructs) and the
    reverse: a BundleError naming both samplers."""
    with pytest.raises(BundleError, match="opensora-v2.0 samples with 'rectified-flow-v2.0'; Pipeline runs 'rectified-flow-v1.2'"):
        Pipeline(v2_bundle, torch_pipeline(v2_bundle, reference).backends)
    pipe = Pipeline.load(tiny_bundle, verify=False)
    assert type(pipe) is Pipeline
    with pytest.raises(InputError, match="takes a size as width x height.*'256px'"):
        pipe.prepare_request("x", resolution="256px")
    with pytest.raises(InputError, match="not a resolution name or aspect ratio \\('16:9'\\)"):
        pipe.prepare_request("x", aspect_ratio="16:9")
    with pytest.raises(BundleError, match="opensora-v1.2 samples with 'rectified-flow-v1.2'; PipelineV2 runs 'rectified-flow-v2.0'"):
        PipelineV2.load(tiny_bundle, verify=False)


@pytest.mark.parametrize("shape,temporal", [((1, 16, 3, 8, 8), False), ((1, 16, 3, 12, 8), False), ((1, 16, 3, 20, 13), False),
                                            ((1, 16, 9, 12, 12), True), ((1, 16, 3, 4, 4), True)])
def test_decode_tile_count_is_the_number_of_decoder_calls(shape, temporal):
    vae = dataclasses.replace(TINY.vae, use_temporal_tiling=temporal, sample_tsize=8)
    calls = []

    def decode(z):
        calls.append(z.shape)
        return np.zeros((z.shape[0], 3, 1 + 4 * (z.shape[2] - 1), 8 * z.shape[3], 8 * z.shape[4]), np.float32)

    tiled_decode(decode, np.zeros(shape, np.float32), vae, vae.use_spatial_tiling, temporal)
    assert decode_tile_count(vae, shape) == len(calls)


def test_decode_tile_count_at_real_size():
    """Design doc 4.3: 256px 16:9 (latent 24x42) decodes as 1x2 tiles, 768px 16:9 (72x128) as 3x6."""
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 24, 42)) == 2
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 72, 128)) == 18
    assert decode_tile_count(HUNYUAN_VAE, (1, 16, 33, 32, 32)) == 1


def test_every_family_has_the_pipeline_of_its_sampler():
    from osx.families import FAMILIES
    from osx.families.base import resolve
    from osx.runtime.pipeline import PIPELINES

    for family in FAMILIES.values():
        assert resolve(PIPELINES[family.sampler.kind]).SAMPLER == family.sampler.kind


def test_real_size_bundle_runs_the_design_docs_buckets():
    """opensora-v2.0 at its full ONNX ranges: the sizes are design/opensora-v2.0.md's table (H x W), typed in."""
    from osx.models_v2 import OPENSORA_V2_0 as REAL
    from osx.runtime.pipeline_v2 import shape_limits_v2

    table = {("256px", "16:9"): (192, 336), ("256px", "9:16"): (336, 192), ("256px", "1:1"): (256, 256),
             ("256px", "2.39:1"): (160, 384), ("256px", "1:2.39"): (384, 160), ("256px", "4:3"): (224, 288),
             ("256px", "3:2"): (208, 304), ("256px", "2:1"): (176, 352), ("768px", "16:9"): (576, 1024),
             ("768px", "9:16"): (1024, 576), ("768px", "1:1"): (768, 768), ("768px", "2.39:1"): (496, 1184),
             ("768px", "4:3"): (656, 880), ("768px", "3:2"): (624, 928), ("768px", "2:1"): (544, 1072)}
    specs = component_specs(REAL)
    lim = shape_limits_v2(REAL, specs, {n: [s.dims] for n, s in specs.items()})
    sizes = {(b["resolution"], b["aspect_ratio"]): (b["height"], b["width"]) for b in lim["sizes"]}
    assert {k: sizes[k] for k in table} == table
    assert [f for f, _ in lim["frames"]] == list(range(1, 130, 4))
