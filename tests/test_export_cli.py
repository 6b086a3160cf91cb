"""`osx export` bad input: each a clear message and exit code 2, before any long work. And how a
checkpoint folder's parts are recognised."""

import pytest

from osx.cli import main
from osx.errors import CheckpointError, OsxError
from osx.export.checkpoint import save_safetensors
from osx.export.checkpoint import find_parts
from osx.export.request import WeightFiles
from osx.families import FAMILIES, family_of
from osx.export.init import seeded_init_
from osx.export.stdit3 import STDiT3
from osx.export.t5 import T5TextEncoder
from osx.export.vae import VideoAutoencoder
from osx.models import get_model_config

TINY = get_model_config("opensora-v1.2-tiny")
WEIGHTS = family_of(TINY).weights


def osx(capsys, *args):
    try:
        main(["export", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out + err


def _state(module):
    return seeded_init_(module, seed=1).state_dict()


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A tiny checkpoint laid out like the real downloads: a denoiser folder, a VAE file and a T5 folder
    with weight shards, an index and spiece.model (a placeholder: loading fails before it is read)."""
    root = tmp_path_factory.mktemp("ckpt")
    save_safetensors(_state(STDiT3(TINY.denoiser)), root / "OpenSora-STDiT-v3" / "model.safetensors")
    save_safetensors(_state(VideoAutoencoder(TINY.vae)), root / "vae-v1.2.safetensors")
    save_safetensors(_state(T5TextEncoder(TINY.text_encoder)), root / "t5-v1_1-xxl" / "model.safetensors", max_shard_bytes=100_000)
    (root / "t5-v1_1-xxl" / "spiece.model").write_bytes(b"placeholder")
    (root / "README.md").write_text("not weights")
    return root


def test_unknown_model_lists_known_ones(capsys, tmp_path):
    code, text = osx(capsys, "--model", "opensora-v9", "--random-weights", "--out", tmp_path / "b")
    assert code == 2 and "unknown model 'opensora-v9'" in text
    assert "opensora-v1.2, opensora-v1.2-tiny" in text


def test_out_exists_without_force(capsys, tmp_path):
    (tmp_path / "b").mkdir()
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--random-weights", "--out", tmp_path / "b")
    assert code == 2 and "already exists" in text and "--force" in text
    assert list((tmp_path / "b").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    ([], "no weights given"),
    (["--random-weights", "--checkpoint", "x"], "--random-weights cannot be combined"),
    (["--denoiser", "d.safetensors"], "no vae, t5 weights given"),
    (["--checkpoint", "missing-dir"], "checkpoint folder missing-dir does not exist"),
])
def test_weights_arguments(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--out", tmp_path / "b", *args)
    assert code == 2 and message in text


@pytest.mark.parametrize("args, message", [
    (["--precision", "int8"], "denoiser int8 needs a calibration set"),
    (["--calibration", "calib"], "--calibration calib was given, but no component is planned at int8 or fp8"),
    (["--gpu", "no-such-gpu"], "unknown GPU profile 'no-such-gpu'"),
    (["--opset", "23"], "Invalid value for '--opset'"),
    (["--reference-dtype", "fp16"], "Invalid value for '--reference-dtype'"),
    (["--dtype", "int8"], "--dtype 'int8': 'int8' is not a dtype"),
    (["--dtype", "vae=fp16"], "--dtype names vae, which this export does not write"),
])
def test_plan_and_option_errors(capsys, tmp_path, args, message):
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--random-weights", "--out", tmp_path / "b", *args)
    assert code == 2 and message in text
    assert not (tmp_path / "b").exists()


def test_parts_found_by_tensor_names(checkpoint_dir, tmp_path):
    assert find_parts(checkpoint_dir, WEIGHTS) == {
        "denoiser": checkpoint_dir / "OpenSora-STDiT-v3",
        "vae": checkpoint_dir / "vae-v1.2.safetensors",
        "t5": checkpoint_dir / "t5-v1_1-xxl",
    }
    # names do not matter where the tensor names can be read
    renamed = tmp_path / "c"
    renamed.mkdir()
    for src, dst in (("OpenSora-STDiT-v3/model.safetensors", "a.safetensors"), ("vae-v1.2.safetensors", "b.safetensors")):
        (renamed / dst).write_bytes((checkpoint_dir / src).read_bytes())
    assert find_parts(renamed, WEIGHTS) == {"denoiser": renamed / "a.safetensors", "vae": renamed / "b.safetensors"}


def test_explicit_paths_override_the_folder(checkpoint_dir, tmp_path):
    other = tmp_path / "my-vae.safetensors"
    other.write_bytes((checkpoint_dir / "vae-v1.2.safetensors").read_bytes())
    parts = WeightFiles(checkpoint_dir, {"vae": other}).resolve(family_of(TINY))
    assert parts["vae"] == other and parts["denoiser"] == checkpoint_dir / "OpenSora-STDiT-v3"


def test_two_candidates_for_one_part(checkpoint_dir, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(checkpoint_dir, copy)
    shutil.copy(copy / "vae-v1.2.safetensors", copy / "vae-old.safetensors")
    with pytest.raises(CheckpointError, match="two VAE weights: vae-old.safetensors and vae-v1.2.safetensors"):
        find_parts(copy, WEIGHTS)


def test_checkpoint_folder_missing_a_part(capsys, checkpoint_dir, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(checkpoint_dir, copy)
    (copy / "vae-v1.2.safetensors").unlink()
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--checkpoint", copy, "--out", tmp_path / "b")
    assert code == 2 and f"checkpoint folder {copy} has no VAE weights" in text and "--vae PATH" in text


def test_t5_must_be_a_folder_with_spiece_model(capsys, checkpoint_dir, tmp_path):
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--checkpoint", checkpoint_dir,
                     "--t5", checkpoint_dir / "t5-v1_1-xxl" / "model.safetensors.index.json", "--out", tmp_path / "b")
    assert code == 2 and "is not a folder with spiece.model" in text and "--t5" in text


def test_key_mismatch_is_the_checkpoint_error(capsys, checkpoint_dir, tmp_path):
    """A denoiser checkpoint with a missing and a renamed key: the loader's CheckpointError, exit 2."""
    state = _state(STDiT3(TINY.denoiser))
    state["final_layer.linear.wieght"] = state.pop("final_layer.linear.weight")
    del state["t_block.1.bias"]
    bad = tmp_path / "bad-denoiser.safetensors"
    save_safetensors(state, bad)
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--checkpoint", checkpoint_dir, "--denoiser", bad,
                     "--out", tmp_path / "b")
    assert code == 2 and "does not fit STDiT3" in text
    assert "2 missing keys: t_block.1.bias, final_layer.linear.weight" in text
    assert "1 unexpected keys: final_layer.linear.wieght" in text
    assert [p.name for p in tmp_path.iterdir()] == ["bad-denoiser.safetensors"]  # no bundle, no temp folder


@pytest.mark.slow
def test_export_from_a_checkpoint_folder(capsys, checkpoint_dir, tmp_path):
    """The real-checkpoint path on the tiny model: parts found in the folder, weights loaded (not the
    random ones), the tokenizer converted from the T5 folder's sentencepiece model, every graph validated.
    Without the VAE encoder: it reads the VAE part through the decoder's reader (`tiny_bundle` exports it)."""
    import json
    import shutil

    import numpy as np
    from tokenizers import Tokenizer

    spm = pytest.importorskip("sentencepiece")
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint_dir, ckpt)
    corpus = tmp_path / "corpus.txt"
    rng = np.random.default_rng(0)  # enough distinct words for a vocabulary that fills the tiny T5's 1024 rows
    words = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(3, 9))) for _ in range(4000)]
    corpus.write_text("\n".join([f"a {c} {a} walks through the {p} at {t}" for c in ("red", "small", "old", "happy")
                                 for a in ("fox", "dog", "cat", "robot") for p in ("snow", "city", "forest", "rain")
                                 for t in ("night", "dawn", "noon")] + [" ".join(words[i:i + 8]) for i in range(0, 4000, 8)]))
    spm.SentencePieceTrainer.train(  # T5's layout: pad 0, eos 1, unk 2, no bos; + 100 extra ids = 1000 of 1024 rows
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=900, model_type="unigram", pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", hard_vocab_limit=False,
        minloglevel=2)
    shutil.copy(tmp_path / "sp.model", ckpt / "t5-v1_1-xxl" / "spiece.model")

    out = tmp_path / "b"
    code, text = osx(capsys, "--model", "opensora-v1.2-tiny", "--checkpoint", ckpt, "--without-vae-encoder", "--out", out)
    assert code == 0, text
    m = json.loads((out / "manifest.json").read_text())
    assert list(m["components"]) == ["text_encoder", "denoiser", "vae_decoder"]  # every part of the folder read
    assert m["export"]["weights"]["vae"] == str(ckpt / "vae-v1.2.safetensors")
    assert all(r["ok"] for c in m["components"].values() for r in c["validation"]["rows"])
    saved = _state(STDiT3(TINY.denoiser))["y_embedder.y_embedding"].numpy()  # the checkpoint's (seed 1) null caption
    np.testing.assert_array_equal(np.load(out / "null_text.npy"), saved)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.encode("a red fox walks through the snow").ids == sp.encode("a red fox walks through the snow") + [1]


def test_weight_options_come_from_the_families(monkeypatch):
    """Each part a family declares is an option of `osx export` and `osx calibrate`; a family declaring a
    new part gets its option with no CLI edit, and a part of another family is refused by name."""
    import dataclasses

    import click

    from osx.commands.calibrate import calibrate
    from osx.commands.export import export
    from osx.commands.weights import weight_options
    from osx.families import WeightSource

    for command in (export, calibrate):
        options = {o for p in command.params for o in p.opts}
        assert {"--checkpoint", "--random-weights", "--denoiser", "--vae", "--t5"} <= options
    new = dataclasses.replace(family_of(TINY), name="new-family", weights=(
        WeightSource("mmdit", "MMDiT weights", ("double_blocks.",), ("mmdit",)),
        WeightSource("flux_ae", "Flux autoencoder weights", ("decoder.up.",), ("flux1-dev-ae",), required=False)))
    monkeypatch.setitem(FAMILIES, new.name, new)
    options = {o for p in weight_options(click.command()(lambda **kw: None)).params for o in p.opts}
    assert {"--mmdit", "--flux-ae", "--denoiser"} <= options
    with pytest.raises(OsxError, match="--mmdit: not a weights part of opensora-v1.2") as e:
        WeightFiles(parts={"mmdit": "x.safetensors"}).resolve(family_of(TINY))
    assert "--denoiser, --vae, --t5" in e.value.hint


def test_calibrate_names_a_missing_part(capsys, checkpoint_dir, tmp_path):
    import shutil

    copy = tmp_path / "c"
    shutil.copytree(checkpoint_dir, copy)
    shutil.rmtree(copy / "OpenSora-STDiT-v3")
    try:
        main(["calibrate", "--model", "opensora-v1.2-tiny", "--checkpoint", str(copy), "--out", str(tmp_path / "cal")])
        code = 0
    except SystemExit as e:
        code = e.code
    text = "".join(capsys.readouterr())
    assert code == 2 and "has no denoiser (STDiT3) weights" in text and "--denoiser PATH" in text


def test_sizes_in_messages_are_width_first():
    from osx.numeric import format_size

    assert format_size(854, 480) == "854x480" and format_size(854, 480, 102) == "854x480, 102 frames"
    assert format_size(64, 64, 1) == "64x64, 1 frame"
