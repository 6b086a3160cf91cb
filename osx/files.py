"""Folders and files written atomically, with the modes a user expects.

`tempfile.mkdtemp` / `mkstemp` create 0700 folders and 0600 files (right for secrets, wrong for a
bundle that root unpacks into /opt/models for a service user to read). Everything osx builds under a
temporary name is given the mode a plain `mkdir` / `open` would have given it (0777 / 0666 less the
umask) before it is renamed into place.

`--force` replaces only what osx itself wrote: `check_replaceable` refuses any other existing path,
saying what it found, so a typo in `--out` never deletes a user's folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable

from osx.errors import OsxError

_umask_lock = threading.Lock()


def current_umask() -> int:
    with _umask_lock:  # os.umask can only be read by setting it; set it straight back
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def make_temp_dir(prefix: str, parent: Path) -> Path:
    """A new, uniquely named folder in `parent` with mkdir's usual mode (0777 less the umask)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def make_temp_file(prefix: str, parent: Path) -> tuple[int, Path]:
    """(fd, path) of a new file in `parent` with open()'s usual mode (0666 less the umask)."""
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=parent)
    os.chmod(tmp, 0o666 & ~current_umask())
    return fd, Path(tmp)


def replace_folder(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an existing `out` is moved aside first (so a crash never mixes the two),
    then deleted."""
    if out.exists() or out.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "b")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def check_replaceable(out: Path, force: bool, *, ours: Callable[[Path], bool], what: str, option: str) -> None:
    """Refuse to write `out` if it exists, unless `force` and it is empty or `ours(out)` (an osx
    bundle, an osx archive). Raises OsxError saying what was found."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise OsxError(f"{out} already exists", hint=f"pass --force to replace it, or choose another {option}")
    if out.is_dir() and not out.is_symlink():
        entries = sorted(p.name for p in out.iterdir())
        if not entries or ours(out):
            return
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        found, kind = f"a folder that is not {what} ({len(entries)} entries: {shown})", "folder"
    elif out.is_file() and not out.is_symlink():
        if out.stat().st_size == 0 or ours(out):
            return
        found, kind = f"a file that is not {what} ({out.stat().st_size} bytes)", "file"
    else:
        found, kind = "a link or special file", "folder"
    raise OsxError(f"{out} is {found}; --force replaces only {what} or an empty {kind}",
                   hint=f"choose another {option}, or remove {out} yourself if you mean to")
