"""The package-dir mapping works for both install kinds: editable (the test environment) and a wheel."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = {"export": "osx.export", "runtime": "osx.runtime", "calibration": "osx.calibration", "profiles": "osx.profiles"}


def test_editable_install_maps_top_level_folders():
    import importlib

    for folder, mod in SUBPACKAGES.items():
        assert Path(importlib.import_module(mod).__file__).parent == ROOT / folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (whl,) = out.glob("osx-*.whl")
    return whl


def test_wheel_contains_every_subpackage_and_data(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for mod in SUBPACKAGES.values():
        assert f"{mod.replace('.', '/')}/__init__.py" in names
    assert any(n.startswith("osx/profiles/") and n.endswith(".toml") for n in names) or not list((ROOT / "profiles").glob("*.toml"))
    assert not any(n.startswith(("export/", "runtime/", "tests/")) for n in names), "folders must only appear under osx/"


def test_wheel_install_imports_runtime(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import osx, osx.runtime, osx.profiles, osx.cli; print(osx.runtime.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         capture_output=True, text=True, check=True).stdout
    assert str(target) in out
