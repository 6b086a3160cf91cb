"""Issue #18 items 12-14: what a newcomer copying the README verbatim tripped on."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from test_bundle_cli import run

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def setup_commands() -> tuple[str, str]:
    """The README's two set-up commands (demo, tests): the `sh` blocks under "Set up"."""
    section = README[README.index("## Set up"):README.index("\n## ", README.index("## Set up") + 1)]
    blocks = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    assert len(blocks) == 2, blocks
    return blocks[0], blocks[1]


@pytest.mark.parametrize("which", [0, 1], ids=["demo", "tests"])
def test_setup_commands_take_torch_from_the_cpu_index_once_per_environment(which):
    command = setup_commands()[which]
    installs = [c.strip() for c in command.split("&&") if re.search(r"\bpip install\b", c)]
    torch_installs = [c for c in installs if re.search(r"\btorch\b", c)]
    for c in torch_installs:  # every install that names torch takes it from the CPU-only index
        assert CPU_INDEX in c and "torch==2.13.0" in c, c
    other = [c for c in installs if c not in torch_installs]
    for c in other:  # and no other install could pull a second (CUDA) torch from PyPI over it
        assert "torch" not in c, c
    envs = [shlex.split(c)[0].split("/bin/")[0] for c in torch_installs]
    assert envs and len(envs) == len(set(envs)), envs  # torch installed once per environment


def test_ci_runs_exactly_the_readme_test_command():
    assert setup_commands()[1] in (ROOT / ".ci" / "run").read_text().splitlines()


def test_no_unpublished_package_names():
    """osx is not on PyPI: installing it by that name would fail, or install someone else's package."""
    files = subprocess.run(["git", "ls-files", "*.py", "*.md", "*.toml"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    bad = [f"{f}:{i + 1}" for f in files for i, line in enumerate((ROOT / f).read_text().splitlines())
           if re.search(r"""pip install ['"]?osx\b|['"`]osx\[""", line)]
    assert bad == []


def test_demo_outputs_are_git_ignored():
    demo = shlex.split(setup_commands()[0].replace("&&", ";"))
    outputs = [demo[i + 1] for i, a in enumerate(demo) if a in ("--out", "--preview") and i + 1 < len(demo)]
    assert {"fox.mp4", "fox.png", "bundles/tiny"} <= set(outputs)
    r = subprocess.run(["git", "check-ignore", "--no-index", *outputs], cwd=ROOT, capture_output=True, text=True)
    assert sorted(r.stdout.split()) == sorted(outputs)


def test_readme_wording():
    assert "there, run them" not in README  # read as "on the machines without a GPU"
    for line in README.splitlines():  # --layers is the benchmark's option, not osx export's
        if "--layers" in line:
            assert "scripts/bench.py" in line, line


def test_pack_unpack_and_verify_count_files_alike(fake_bundle, tmp_path, capsys):
    tar = tmp_path / "m.osx.tar"
    outs = [run(capsys, "bundle", "pack", fake_bundle, "-o", tar)[1], run(capsys, "bundle", "verify", fake_bundle)[1],
            run(capsys, "bundle", "unpack", tar, tmp_path / "u")[1]]
    assert all("5 files + manifest.json" in o for o in outs), outs


def test_info_shows_what_generate_accepts(fake_bundle, capsys):
    code, out, _ = run(capsys, "bundle", "info", fake_bundle)
    assert code == 0
    assert "generate  width 16..128 px, height 16..128 px (multiples of 8; other sizes are rounded down), frames 1, 17..51" in out
