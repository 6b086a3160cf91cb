"""Issue #18 items 6, 7 and 10: a bundle that cannot work fails at export, `bundle verify` or open, with
the reason, instead of crashing or misleading later: a tokenizer that does not fit the text encoder, a
manifest edited out of shape, a TensorRT backend without engines."""

import json
import shutil

import pytest
from tokenizers import Tokenizer, models

from osx.bundle import sha256_file
from osx.errors import BundleError, CheckpointError
from osx.runtime import shim
from osx.runtime.pipeline import Pipeline
from test_bundle_cli import run


def small_tokenizer(size: int = 100) -> Tokenizer:
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(f"w{i}", -1.0) for i in range(size - 3)]
    return Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))


@pytest.fixture
def copy(tiny_bundle, tmp_path):
    out = tmp_path / "b"
    shutil.copytree(tiny_bundle, out)
    return out


def edit(bundle, change=None):
    """Apply `change(manifest)` and re-list every file's size and sha256, as a careful forger would."""
    m = json.loads((bundle / "manifest.json").read_text())
    if change:
        change(m)
    for rel in m["files"]:
        m["files"][rel] = {"sha256": sha256_file(bundle / rel), "bytes": (bundle / rel).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_a_tokenizer_smaller_than_the_embedding_is_refused_at_load(copy, capsys):
    small_tokenizer().save(str(copy / "tokenizer.json"))
    edit(copy)
    with pytest.raises(BundleError, match="the tokenizer has 100 tokens, the text encoder's embedding has 1024 rows"):
        Pipeline.load(copy)
    code, _, err = run(capsys, "generate", copy, "--prompt", "x", "--out", copy.parent / "a.mp4")
    assert code == 2 and "100 tokens" in err and not (copy.parent / "a.mp4").exists()


def test_export_refuses_a_tokenizer_that_does_not_fit(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from osx.export import reference
    from osx.export.exporter import export_bundle
    from osx.export.request import RANDOM_WEIGHTS, ExportRequest

    monkeypatch.setattr(reference, "build_tiny_tokenizer", lambda cfg: small_tokenizer())
    with pytest.raises(CheckpointError, match="100 tokens"):
        # the text encoder alone: the check reads its vocabulary, the other components add only time
        export_bundle(ExportRequest("opensora-v1.2-tiny", tmp_path / "b", RANDOM_WEIGHTS, only=("text_encoder",),
                                    progress=lambda m: None))
    assert list(tmp_path.iterdir()) == []


def _range(component, dim, **values):
    def change(m):
        m["components"][component]["io"]["dims"][dim].update(values)
    return change


def _dtype(component, tensor, dtype):
    def change(m):
        next(t for t in m["components"][component]["io"]["inputs"] if t["name"] == tensor)["dtype"] = dtype
    return change


def test_verify_and_open_refuse_a_range_with_min_over_max(copy, capsys):
    edit(copy, _range("denoiser", "latent_height", min=12, opt=12, max=2))
    code, _, err = run(capsys, "bundle", "verify", copy)
    assert code == 1 and "range of 'latent_height' is min=12 opt=12 max=2" in err
    with pytest.raises(BundleError, match="latent_height"):
        Pipeline.load(copy)
    assert shim.open_bundle(str(copy), "{}") == shim.ERR_BUNDLE and "latent_height" in shim.last_error()


def test_verify_and_open_refuse_an_edited_input_dtype(copy, capsys):
    edit(copy, _dtype("denoiser", "x", "float16"))
    code, _, err = run(capsys, "bundle", "verify", copy)
    assert code == 1 and "disagree with denoiser.onnx" in err and "x: manifest float16, graph float32" in err
    pipe = Pipeline.load(copy)
    with pytest.raises(BundleError, match="input 'x' is tensor\\(float\\) in the graph, the manifest says float16"):
        pipe.generate("x", num_frames=17, height=32, width=32, steps=1)


def test_verify_refuses_an_unknown_dtype(copy, capsys):
    edit(copy, _dtype("text_encoder", "input_ids", "int4096"))
    code, _, err = run(capsys, "bundle", "verify", copy)
    assert code == 1 and "'int4096'" in err


def test_tensorrt_backend_without_engines_fails_at_open(tiny_bundle):
    with pytest.raises(BundleError, match="no TensorRT engine") as e:
        Pipeline.load(tiny_bundle, "tensorrt")
    assert "osx build" in e.value.hint
    assert shim.open_bundle(str(tiny_bundle), '{"backend": "tensorrt"}') == shim.ERR_BUNDLE
    assert "osx build" in shim.last_error()
