"""Open-Sora v2.0 through the streamed exporter: the forward adapters give each torch module the I/O the family
declares, and the tiny components export from a random checkpoint and match PyTorch in onnxruntime."""

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer

from osx.export.adapters_v2 import forward_adapter
from osx.export.mmdit import video_rope
from osx.export.pipeline_v2 import build_reference_v2, part_factories, random_init_std
from osx.families import component_specs, get_family, resolve
from osx.models_v2 import OPENSORA_V2_0_TINY as TINY
from osx.models_v2 import rope_tables

SPECS = component_specs(TINY)


@pytest.fixture(scope="module")
def ref():
    return build_reference_v2(TINY, dtype=torch.float32)


def _inputs(name, sizes, seed=0):
    return tuple(torch.from_numpy(a) for a in SPECS[name].sample_inputs(sizes, seed=seed).values())


def test_the_family_names_these_adapters():
    assert resolve(get_family(TINY.family).forward_adapter) is forward_adapter


def test_denoiser_adapter_is_the_mmdit_with_the_video_rope(ref):
    T, h, w = 2, 3, 4
    img, txt, t, y, cond, _, _ = _inputs("denoiser", {"batch": 3, "tokens": T * h * w})
    cos, sin = (torch.from_numpy(a) for a in rope_tables(TINY.mmdit, T, h, w))
    with torch.no_grad():
        got = forward_adapter("denoiser", ref.mmdit)(img, txt, t, y, cond, cos, sin)
        want = ref.mmdit(img, txt, t, y, cond, *video_rope(TINY.mmdit, txt.shape[1], T, h, w))
    assert got.shape == (3, T * h * w, TINY.mmdit.in_channels)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)  # the tables may differ in a last bit
    with torch.no_grad():  # the tables matter: a shifted position changes the output
        moved = forward_adapter("denoiser", ref.mmdit)(img, txt, t, y, cond, cos.roll(1, 0), sin.roll(1, 0))
    assert (moved - want).abs().max() > 1e-3 * want.abs().max()


def test_text_and_vae_adapters_are_the_reference_calls(ref):
    ids = _inputs("text_encoder", {"batch": 2})[0]
    with torch.no_grad():
        torch.testing.assert_close(forward_adapter("text_encoder", ref.t5)(ids), ref.t5(ids, torch.ones_like(ids)), rtol=0, atol=0)
        video = torch.rand(1, 3, 5, 32, 48) * 2 - 1  # one tile of the tiny VAE (64 px)
        torch.testing.assert_close(forward_adapter("vae_encoder", ref.vae)(video), ref.vae.encode(video), rtol=1e-6, atol=1e-6)
        z = torch.randn(1, 16, 2, 4, 6)
        torch.testing.assert_close(forward_adapter("vae_decoder", ref.vae)(z), ref.vae.decode(z), rtol=1e-6, atol=1e-6)


def test_denoiser_streams_from_a_random_checkpoint_and_validates(tmp_path):
    """The streamed path the exporter takes: random checkpoint -> meta trace -> initializers from the file
    (sha256-checked) -> onnxruntime vs PyTorch at the two validation shapes (tolerance 1e-4 of the scale)."""
    from osx.export.checkpoint import CheckpointReader
    from osx.export.init import write_random_part
    from osx.export.onnx_export import export_streamed
    from osx.export.stream import Weights
    from osx.export.validate import validate_component, validation_shapes

    factory = part_factories(TINY)["mmdit"]
    path = write_random_part(factory, tmp_path / "mmdit.safetensors", torch.float32, 0, random_init_std(TINY)["mmdit"])
    reader = CheckpointReader(path)
    info = export_streamed(Weights(factory, reader), SPECS["denoiser"], tmp_path / "denoiser.onnx", adapter=forward_adapter)
    assert info.weights_check["from_checkpoint_sha256_ok"] == len(reader.keys())
    module = Weights(factory, reader).materialize(torch.float32)
    rows = validate_component(module, tmp_path / "denoiser.onnx", SPECS["denoiser"], validation_shapes(SPECS["denoiser"]),
                              adapter=forward_adapter)
    assert [r["shape"]["tokens"] for r in rows] == [SPECS["denoiser"].dims["tokens"].min, SPECS["denoiser"].dims["tokens"].min + 3]
    assert all(r["ok"] and r["max_rel"] < 1e-4 for r in rows)
    import onnx

    graph = onnx.load(str(tmp_path / "denoiser.onnx"), load_external_data=False).graph
    assert [i.name for i in graph.input] == [t.name for t in SPECS["denoiser"].inputs]
    rope = graph.input[5].type.tensor_type.shape.dim  # rope_cos [tokens, head_dim]: one dim shared with img
    assert (rope[0].dim_param, rope[1].dim_value) == ("tokens", TINY.mmdit.head_dim)


def test_osx_export_writes_a_bundle_verify_accepts(tiny_v2_bundle, capsys):
    from osx.bundle import Bundle
    from osx.cli import main
    from osx.export.pipeline_v2 import tokenizers

    family = get_family(TINY.family)
    bundle = Bundle.open(tiny_v2_bundle)
    m = bundle.manifest
    # vae_encoder too (--with-vae-encoder); not the t2i set (--with-t2i: tests/test_t2i2v_export.py)
    assert tuple(m.components) == tuple(n for n in family.names() if n not in family.optional_set("t2i"))
    fp32 = dataclasses.replace(TINY, sampler=dataclasses.replace(TINY.sampler, reference_dtype="fp32"))  # --reference-dtype fp32
    assert m.model_config() == fp32 and m.scheduler == dataclasses.asdict(fp32.sampler)
    for name, c in m.components.items():
        declared = SPECS[name].with_precision("float32").to_dict()
        assert (c.io.to_dict()["inputs"], c.io.to_dict()["outputs"]) == (declared["inputs"], declared["outputs"])
        assert all(r["ok"] and r["max_rel"] <= 1e-4 for r in c.report["validation"]["rows"]), name
    # the MMDiT fused for onnxruntime (its affine-free LayerNorms given a zero bias first), checked against the portable graph
    fused = m.components["denoiser"].report["onnxruntime_graph"]
    assert m.components["denoiser"].onnxruntime_file == "denoiser.ort.onnx" and fused["attention_unfused"] == 0
    assert {"SkipLayerNormalization", "SimplifiedLayerNormalization", "FastGelu", "MultiHeadAttention"} <= set(fused["fused"])
    assert all(r["ok"] and r["max_rel"] <= 1e-4 for r in fused["rows"])
    # both tokenizers, as the family declares them, equal to the tiny ones the reference uses
    want = tokenizers(TINY, None)
    assert {e: t["file"] for e, t in m.tokenizer["encoders"].items()} == {t.encoder: t.file for t in family.prompt.tokenizers}
    for encoder, entry in m.tokenizer["encoders"].items():
        saved = Tokenizer.from_file(str(bundle.path(entry["file"])))
        assert saved.encode("a red fox. 24 FPS.").ids == want[encoder].encode("a red fox. 24 FPS.").ids
        assert entry["max_length"] == SPECS[encoder].inputs[0].shape[1]
    main(["bundle", "verify", str(tiny_v2_bundle)])  # exits (2) on any problem
    assert "all sha256 match" in capsys.readouterr().out


def test_the_runtime_runs_the_exported_bundle(tiny_v2_bundle):
    """The declared I/O is what the v2.0 runtime feeds: a video comes out (parity: tests/test_pipeline_v2*.py)."""
    from osx.runtime.pipeline import Pipeline

    frames = Pipeline.load(tiny_v2_bundle).generate("a red fox in the snow", seed=3, steps=2)
    assert frames.shape == (TINY.defaults.num_frames, 64, 64, 3) and frames.dtype.name == "uint8" and frames.std() > 0
