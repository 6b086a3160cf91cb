"""`osx bundle info|verify|pack|unpack` on folders and archives, through the real entry point."""

import json
import tarfile

import pytest

from osx.cli import main


def run(capsys, *args):
    """(exit code, stdout, stderr) of `osx ARGS` as a user would get them."""
    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def packed(fake_bundle, tmp_path, capsys):
    tar_path = tmp_path / "model.osx.tar"
    code, out, _ = run(capsys, "bundle", "pack", fake_bundle, "-o", tar_path)
    assert code == 0 and "packed" in out
    return tar_path


def _flip_byte(path, offset=5):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_ok_folder_and_archive(fake_bundle, packed, capsys):
    for path in (fake_bundle, packed):
        code, out, err = run(capsys, "bundle", "verify", path)
        assert code == 0, err
        assert out.count("\n") == 1 and out.startswith("OK:") and "5 files" in out


@pytest.mark.parametrize("damage,named", [
    (lambda b: _flip_byte(b / "denoiser.onnx"), "checksum mismatch for denoiser.onnx"),
    (lambda b: (b / "engines" / "denoiser.plan").unlink(), "missing file engines/denoiser.plan"),
    (lambda b: (b / "tokenizer.json").write_text('{"model": "other"}'), "tokenizer.json has"),
    (lambda b: (b / "stray.bin").write_bytes(b"x"), "stray.bin"),
])
def test_verify_folder_names_the_bad_file(fake_bundle, capsys, damage, named):
    damage(fake_bundle)
    code, out, err = run(capsys, "bundle", "verify", fake_bundle)
    assert code == 1 and named in err and out == ""


def _edit_manifest(bundle_dir, edit):
    m = json.loads((bundle_dir / "manifest.json").read_text())
    edit(m)
    (bundle_dir / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit,named", [
    (lambda m: m["files"]["vae_decoder.onnx"].update(sha256="0" * 64), "checksum mismatch for vae_decoder.onnx"),
    (lambda m: m["files"]["text_encoder.onnx"].update(bytes=1), "text_encoder.onnx has"),
    (lambda m: m.pop("tokenizer"), "manifest.json: manifest lacks tokenizer"),
    (lambda m: m["components"]["denoiser"].update(precision=16), "manifest field components.denoiser.precision must be str"),
    (lambda m: m["components"]["denoiser"]["engines"][0]["key"].pop("tensorrt_version"),
     "manifest lacks components.denoiser.engines[0].key.tensorrt_version"),
    (lambda m: m["components"]["denoiser"].update(file="gone.onnx"), "refers to 'gone.onnx'"),
])
def test_verify_edited_manifest(fake_bundle, capsys, edit, named):
    _edit_manifest(fake_bundle, edit)
    code, _, err = run(capsys, "bundle", "verify", fake_bundle)
    assert code == 1 and named in err


def test_verify_manifest_not_json(fake_bundle, capsys):
    (fake_bundle / "manifest.json").write_text("{ truncated")
    code, _, err = run(capsys, "bundle", "verify", fake_bundle)
    assert code == 1 and "manifest.json is not valid JSON" in err


def test_verify_archive_with_flipped_byte(packed, capsys):
    with tarfile.open(packed) as tar:
        member = tar.getmember("vae_decoder.onnx")
    _flip_byte(packed, member.offset_data + 7)  # inside the member's data: headers stay valid
    code, _, err = run(capsys, "bundle", "verify", packed)
    assert code == 1 and "checksum mismatch for vae_decoder.onnx" in err


def test_info_shows_components_shapes_and_engine_needs(fake_bundle, packed, capsys):
    manifest = json.loads((fake_bundle / "manifest.json").read_text())
    for path in (fake_bundle, packed):
        code, out, err = run(capsys, "bundle", "info", path)
        assert code == 0, err
        for name, comp in manifest["components"].items():
            row = next(line.split() for line in out.splitlines() if line.split()[:1] == [name])
            assert row[1:4] == [comp["backend"], comp["precision"], comp["file"]]
        dims = manifest["components"]["denoiser"]["io"]["dims"]["latent_frames"]
        assert f"latent_frames {dims['min']}..{dims['max']} (opt {dims['opt']})" in out
        engine_row = next(line for line in out.splitlines() if "engines/denoiser.plan" in line)
        assert "NVIDIA GeForce RTX 4090" in engine_row and "fp16" in engine_row
        assert "compute capability 8.9" in engine_row and "10.3.0" in engine_row
        assert "2.9 KiB" in engine_row  # 3000 bytes


def test_info_portable_engine(fake_bundle, capsys):
    _edit_manifest(fake_bundle, lambda m: m["components"]["denoiser"]["engines"][0]["key"].update(
        hardware_compatibility="ampere_plus", version_compatible=True))
    code, out, _ = run(capsys, "bundle", "info", fake_bundle)
    engine_row = next(line for line in out.splitlines() if "engines/denoiser.plan" in line)
    assert code == 0 and "compute capability >= 8.0" in engine_row and ">= 10.3.0 (version-compatible)" in engine_row


def test_pack_unpack_cli_round_trip(packed, tmp_path, capsys):
    out_dir = tmp_path / "unpacked"
    code, out, err = run(capsys, "bundle", "unpack", packed, out_dir)
    assert code == 0, err
    assert run(capsys, "bundle", "verify", out_dir)[0] == 0
    code, _, err = run(capsys, "bundle", "unpack", packed, out_dir)  # exists: refused, user error
    assert code == 2 and "already exists" in err and "--force" in err
    assert run(capsys, "bundle", "unpack", packed, out_dir, "--force")[0] == 0


def test_verify_missing_path_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(capsys, "bundle", "verify", tmp_path / "nope")
    assert code == 2 and "does not exist" in err
