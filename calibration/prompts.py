"""Prompt sets: `calibration.txt` (activation ranges) and `heldout.txt` (quality gate), one per line."""

from __future__ import annotations

import os
from pathlib import Path

from osx.errors import OsxError

PROMPT_DIR = Path(__file__).parent / "prompts"
CALIBRATION = PROMPT_DIR / "calibration.txt"
HELDOUT = PROMPT_DIR / "heldout.txt"


def load_prompts(path: str | os.PathLike = CALIBRATION) -> list[str]:
    """Non-empty lines of a prompt file; lines starting with '#' are comments."""
    path = Path(path)
    if not path.is_file():
        raise OsxError(f"prompt file {path} does not exist", hint="pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise OsxError(f"prompt file {path} has no prompts", hint="write one prompt per line ('#' starts a comment)")
    return prompts
