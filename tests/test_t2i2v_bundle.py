"""`osx export --with-t2i` and text -> image -> video over the exported tiny bundle (runtime/t2i2v.py through
PipelineV2, `osx generate`, the shim), against the torch reference of the whole flow with the same seeds
(export/sampler_flux.py `reference_t2i2v`: the image step, its PNG as the i2v_head reference of
`reference_generate_v2`).

The bundle is exported at reference dtype fp32 (no bf16 rounding in either loop), so the graphs' float32
differences from torch (validation: within 1e-4 of scale) are not amplified by bf16 flips. Tolerance of the whole
flow: 1e-4 relative on the video's latent (the issue's), the PNG within 1 uint8 level, frames within 1 level. The
one discontinuity left is the PNG's uint8 rounding: measured 0.1 % of its values one level apart, which moves the
video latent 4.6e-5; the same video on the runtime's own PNG is within 4e-6. Open-Sora's bf16 flow is tested
bit-exact over the torch modules (tests/test_t2i2v.py); over bf16 graphs it drifts as #15 describes (measured here
on a bf16 export: PNG 2 levels, latent 3.8e-3, frames 2 levels).
"""

import dataclasses
import json

import numpy as np
import pytest

from osx.bundle import Bundle
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY, T2I_CONFIGS
from osx.runtime import shim
from osx.runtime.pipeline import Pipeline
from osx.runtime.progress import PHASES
from osx.runtime.t2i2v import T2I_COMPONENTS
from test_planner_v2 import run_cli

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore::osx.runtime.tokenizer.PromptTruncatedWarning")]
T2I = T2I_CONFIGS[TINY.name]
PROMPT = "a lighthouse at dusk"


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def cli(*args) -> tuple[int, str]:
    """`osx ARGS`: (exit code, what it printed)."""
    return run_cli(*map(str, args))


@pytest.fixture(scope="module")
def torch_models(tiny_t2i_bundle):
    """The torch modules the bundle was exported from (seeded alike, float32) at its reference dtype."""
    from osx.export.flux_ae import FluxAEDecoder
    from osx.export.init import seeded_init_
    from osx.export.mmdit import MMDiT
    from osx.export.pipeline_v2 import build_reference_v2

    cfg = Bundle.open(tiny_t2i_bundle, verify=False).manifest.model_config()
    assert cfg.sampler.reference_dtype == "fp32" and cfg == dataclasses.replace(TINY, sampler=cfg.sampler)
    seed = cfg.random_init_seed
    flux = seeded_init_(MMDiT(T2I.mmdit, "fp32"), seed).eval()
    return build_reference_v2(cfg, dtype=torch.float32), flux, seeded_init_(FluxAEDecoder(T2I.ae), seed).eval()


def test_the_bundle_holds_the_t2i_components_validated(tiny_t2i_bundle):
    bundle = Bundle.open(tiny_t2i_bundle)  # every file's size and sha256
    for name in T2I_COMPONENTS:
        entry = bundle.components[name]
        rows = entry.report["validation"]["rows"]
        assert len(rows) == 2 and all(r["ok"] and r["max_rel"] < 1e-4 for r in rows), rows
        assert entry.file in bundle.manifest.files and entry.report["weights_check"]["from_checkpoint_sha256_ok"] > 0
    assert cli("bundle", "verify", tiny_t2i_bundle)[0] == 0


def test_whole_flow_against_the_torch_reference(tiny_t2i_bundle, torch_models):
    from osx.export.pipeline_v2 import reference_generate_v2
    from osx.export.sampler_flux import reference_t2i2v

    pipe = Pipeline.load(tiny_t2i_bundle)
    latents, decode = [], pipe.decode
    pipe.decode = lambda latent, *a: latents.append(latent.copy()) or decode(latent, *a)
    events = []
    kw = dict(aspect_ratio="16:9", seed=5, steps=4)
    frames = pipe.generate(PROMPT, t2i_steps=3, progress=events.append, **kw)
    model = torch_models[0]
    image, want = reference_t2i2v(*torch_models, T2I, PROMPT, t2i_steps=3, num_steps=4, seed=5, aspect_ratio="16:9")
    assert want.cond_type == "i2v_head" and frames.shape == want.frames.shape
    assert pipe.t2i_image.shape == image.png.shape
    png_levels = int(np.max(np.abs(pipe.t2i_image.astype(int) - image.png)))
    err, levels = rel(latents[0], want.latent), int(np.max(np.abs(frames.astype(int) - want.frames)))
    on_own_png = reference_generate_v2(model, PROMPT, cond_type="i2v_head", references=[pipe.t2i_image], num_steps=4,
                                       seed=5, height=want.height, width=want.width)
    print(f"PNG {png_levels} levels ({np.mean(pipe.t2i_image != image.png):.2%} differ); latent {err:.2e} "
          f"({rel(latents[0], on_own_png.latent):.2e} from the video on the runtime's PNG); frames {levels} levels")
    assert png_levels <= 1 and np.mean(pipe.t2i_image != image.png) < 0.01  # measured 1 level, 0.10 %
    assert err < 1e-4, f"latent {err:.2e} relative"  # measured 4.6e-5
    assert rel(latents[0], on_own_png.latent) < 1e-5 and levels <= 1  # the video alone; frames 1 level
    phases = [e["phase"] for e in events]
    assert phases == sorted(phases, key=PHASES.index) and "vae_encode" in phases
    assert [p for p, _ in pipe.progress_phases(pipe.prepare_request(PROMPT, t2i_steps=3, **kw))] == list(dict.fromkeys(phases))


def test_generate_runs_both_loops_by_default_and_not_with_no_t2i2v(tiny_t2i_bundle, tmp_path):
    code, out = cli("generate", tiny_t2i_bundle, "--prompt", PROMPT, "--out", tmp_path / "a.mp4", "--progress-json",
                    "--t2i-steps", "2")
    assert code == 0, out
    events = [json.loads(line) for line in out.splitlines() if '"progress"' in line]
    phases = [e["phase"] for e in events]
    assert {"t2i", "t2i_decode", "denoise"} <= set(phases) and phases.index("t2i") < phases.index("denoise")
    assert {e["total"] for e in events if e["phase"] == "t2i"} == {2}  # --t2i-steps
    code, out = cli("generate", tiny_t2i_bundle, "--prompt", PROMPT, "--out", tmp_path / "b.mp4", "--progress-json", "--no-t2i2v")
    assert code == 0 and '"t2i"' not in out, out


def test_t2i2v_refusals(tiny_t2i_bundle, tiny_v2_bundle, tmp_path):
    image = tmp_path / "ref.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    code, out = cli("generate", tiny_t2i_bundle, "--prompt", "x", "--out", tmp_path / "c.mp4", "--t2i2v", "--image", image)
    assert code == 2 and "takes no reference image" in out and "--no-t2i2v" in out
    # a bundle exported without --with-t2i: says how to add the components
    code, out = cli("generate", tiny_v2_bundle, "--prompt", "x", "--out", tmp_path / "d.mp4", "--t2i2v")
    assert code == 2 and "no t2i_denoiser and no t2i_decoder" in out and "--with-t2i" in out, out
    assert not (tmp_path / "d.mp4").exists()
    # --t2i-steps: bounded, and only where an image step runs
    for bundle, args, says in ((tiny_t2i_bundle, ["--t2i-steps", "0"], "t2i steps=0 is outside 1..1000"),
                               (tiny_t2i_bundle, ["--t2i-steps", "1001"], "t2i steps=1001 is outside"),
                               (tiny_t2i_bundle, ["--t2i-steps", "2", "--no-t2i2v"], "t2i2v is off"),
                               (tiny_v2_bundle, ["--t2i-steps", "2"], "the bundle has no t2i components")):
        code, out = cli("generate", bundle, "--prompt", "x", "--out", tmp_path / "e.mp4", *args)
        assert code == 2 and says in out and "Traceback" not in out, out
    assert not (tmp_path / "e.mp4").exists()


def test_the_image_steps_a_request_runs(tiny_t2i_bundle, tiny_v2_bundle, tiny_bundle):
    """t2i2v.steps (what `osx serve` bounds by --max-steps): the model's default where the image step runs by
    default, the asked steps, None where it does not run (off, a reference, no Flux, a v1.2 bundle), and the
    run's refusal of t2i2v with a reference."""
    from osx.errors import InputError
    from osx.runtime import t2i2v

    t2i, v2, v12 = (Pipeline.load(b, verify=False) for b in (tiny_t2i_bundle, tiny_v2_bundle, tiny_bundle))
    assert t2i2v.steps(t2i, t2i.prepare_request("x")) == T2I_CONFIGS[TINY.name].num_steps
    assert t2i2v.steps(t2i, t2i.prepare_request("x", t2i_steps=3)) == 3
    assert t2i2v.steps(t2i, t2i.prepare_request("x", t2i2v=False)) is None
    assert t2i2v.steps(t2i, t2i.prepare_request("x"), reference=True) is None
    with pytest.raises(InputError, match="takes no reference"):
        t2i2v.steps(t2i, t2i.prepare_request("x", t2i2v=True), reference=True)
    assert t2i2v.steps(v2, v2.prepare_request("x")) is None
    assert t2i2v.steps(v12, v12.prepare_request("x")) is None


def test_a_v1_2_pipeline_refuses_the_v2_0_options(tiny_bundle):
    """Pipeline.generate on a v1.2 bundle: t2i2v / t2i_steps (and v2.0's sizes) are an InputError saying why, not a TypeError."""
    from osx.errors import InputError

    pipe = Pipeline.load(tiny_bundle, verify=False)
    for option, says in (({"t2i2v": True}, "no text-to-image step"), ({"t2i_steps": 3}, "no text-to-image step"),
                         ({"resolution": "256px"}, "not a resolution name"), ({"guidance_img": 2.0}, "no image guidance")):
        with pytest.raises(InputError, match=says):
            pipe.generate("x", steps=1, **option)


def test_shim_takes_the_t2i2v_options(tiny_t2i_bundle):
    handle = shim.open_bundle(str(tiny_t2i_bundle), "{}")
    try:
        status, _, shape = shim.generate_to_buffer(handle, PROMPT, json.dumps({"t2i2v": True, "t2i_steps": 2, "steps": 2}))
        assert status == shim.OK and shape[0] == TINY.defaults.num_frames, shim.last_error()
        status, _, _ = shim.generate_to_buffer(handle, PROMPT, json.dumps({"t2i2v": "yes"}))
        assert status == shim.ERR_INVALID_ARGUMENT and "t2i2v" in shim.last_error()
    finally:
        shim.close(handle)


def test_a_checkpoint_without_flux_is_refused_before_anything_is_exported():
    from pathlib import Path

    from osx.errors import CheckpointError
    from osx.export.exporter import _check_optional_weights
    from osx.families import get_family

    family = get_family(TINY.family)
    parts = {p: Path(p) for p in ("mmdit", "vae", "t5", "clip", "flux")}
    with pytest.raises(CheckpointError, match="t2i_decoder need Flux autoencoder weights") as e:
        _check_optional_weights(family, family.optional_set("t2i"), parts)
    assert "flux1-dev-ae.safetensors" in e.value.hint and "--flux-ae PATH" in e.value.hint and "--with-t2i" in e.value.hint
    _check_optional_weights(family, family.optional_set("t2i"), {**parts, "flux_ae": Path("ae")})  # all there: fine


def test_a_real_size_flux_is_validated_at_a_cut_of_its_blocks():
    """Flux.1-dev's 47.6 GB of float32 weights exceed the validation budget: validated at full width with one
    block of each kind, as the MMDiT (the cut is a config: the model's `t2i`, recorded in the manifest)."""
    from osx.export.exporter import export_parts, validation_config
    from osx.export.mmdit import MMDiT
    from osx.families import get_family
    from osx.models_v2 import OPENSORA_V2_0, OpenSoraV2Config

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in MMDiT(OPENSORA_V2_0.t2i.mmdit).state_dict().items()}

    class Reader:  # the checkpoint's names and shapes, no tensors
        def keys(self):
            return list(shapes)

        def shape(self, key):
            return shapes[key]

    cfg, depth = validation_config("t2i_denoiser", OPENSORA_V2_0, Reader())
    assert depth == {"t2i.mmdit.depth": [1, 19], "t2i.mmdit.depth_single_blocks": [1, 38]}
    assert cfg.mmdit == OPENSORA_V2_0.mmdit and cfg.t2i.mmdit.hidden_size == OPENSORA_V2_0.t2i.mmdit.hidden_size
    with torch.device("meta"):
        cut = export_parts(get_family(cfg.family)).part_factories(cfg)["flux"]()
    assert (len(cut.double_blocks), len(cut.single_blocks)) == (1, 1)
    for model in (TINY, OPENSORA_V2_0):  # the manifest's config, read back
        assert OpenSoraV2Config.from_dict(json.loads(json.dumps(model.to_dict()))) == model
