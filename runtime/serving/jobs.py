"""The jobs of `osx serve`, kept as files in one folder that the ingress and every replica can read
(`--store`; shared storage when replicas run on several machines).

    STORE/<id>/status.<n>.json  the job: state, progress, error, request, times; replaced atomically by
                             the writer of attempt n (see below); the highest n is the job's status
    STORE/<id>/video.mp4     the result, renamed into place before the state says `succeeded`
    STORE/<id>/reference.image|video  the request's uploaded reference, if any (serving/references.py)
    STORE/<id>/cancel        present once someone asked to cancel it
    STORE/<id>/claim.<n>     who runs attempt n: created exclusively (O_EXCL) by the replica that starts
                             it, or by the ingress cancelling it before any replica did

States: queued -> running -> succeeded | failed | cancelled. One writer at a time, decided by the claim:
the ingress until a replica claims the attempt, then that replica; the ingress again only after that
replica died. A replica that Ray reported dead can still be running for a moment and write: its writes
go to its own attempt's file, which the next attempt's file outranks, so it can overwrite nothing (it
once overwrote the retry's "queued, retried_because" status). Finished jobs are removed `keep` seconds
after they finished.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from osx.errors import OsxError

FINAL = ("succeeded", "failed", "cancelled")
_ID = re.compile(r"vid_[0-9a-f]{24}")
_STATUS = re.compile(r"status\.(\d+)\.json")


class JobStore:
    def __init__(self, root: str | os.PathLike, keep_s: float = 3600.0):
        self.root = Path(root)
        self.keep_s = float(keep_s)

    def check(self) -> "JobStore":
        """Create the folder if needed and prove it writable (a clear error now, not a failed job later)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe-{secrets.token_hex(4)}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise OsxError(f"cannot use {self.root} as the job store: {e.strerror or e}",
                           hint="give --store a folder you can write to (shared storage when replicas run on several machines)") from None
        return self

    # --- paths -----------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path | None:
        """The job's folder, or None for a string that is not a job id (never a path outside the store)."""
        return self.root / job_id if isinstance(job_id, str) and _ID.fullmatch(job_id) else None

    def video(self, job_id: str) -> Path:
        return self.root / job_id / "video.mp4"

    # --- status ----------------------------------------------------------------------------------
    def create(self, model: str, request: dict) -> dict:
        job_id = "vid_" + secrets.token_hex(12)
        (self.root / job_id).mkdir()
        now = time.time()
        status = {"id": job_id, "model": model, "state": "queued", "attempt": 1, "progress": None, "error": None,
                  "request": request, "created": now, "updated": now, "finished": None, "result": None}
        self.write(status)
        return status

    def read(self, job_id: str) -> dict | None:
        """The job's status: its highest-numbered status file."""
        folder = self.folder(job_id)
        try:
            epochs = [int(m.group(1)) for m in map(_STATUS.fullmatch, os.listdir(folder)) if m] if folder else []
            return json.loads((folder / f"status.{max(epochs)}.json").read_text()) if epochs else None
        except (OSError, ValueError):
            return None

    def write(self, status: dict, epoch: int | None = None) -> dict:
        """Replace the status file of `epoch` (default: the status's attempt) atomically (temp file in the
        same folder + rename). The writer must hold that claim, or be the ingress before anyone does."""
        status["updated"] = time.time()
        if status["state"] in FINAL and not status.get("finished"):
            status["finished"] = status["updated"]
        path = self.root / status["id"] / f"status.{status['attempt'] if epoch is None else epoch}.json"
        tmp = path.with_name(f".status.{secrets.token_hex(4)}.tmp")
        try:
            tmp.write_text(json.dumps(status))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return status

    def update(self, job_id: str, **fields) -> dict | None:
        status = self.read(job_id)
        return None if status is None else self.write({**status, **fields})

    # --- ownership and cancelling ----------------------------------------------------------------
    def claim(self, job_id: str, attempt: int) -> bool:
        """True for the one caller that runs (or cancels) this attempt; False for everyone else."""
        try:
            os.close(os.open(self.root / job_id / f"claim.{attempt}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def request_cancel(self, job_id: str) -> None:
        (self.root / job_id / "cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        return (self.root / job_id / "cancel").exists()

    # --- removal ---------------------------------------------------------------------------------
    def delete(self, job_id: str) -> None:
        """Remove a job: renamed out of sight first, so readers see it whole or not at all."""
        folder = self.folder(job_id)
        trash = self.root / f".trash-{job_id}-{secrets.token_hex(4)}"
        try:
            os.replace(folder, trash)
        except OSError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def expire(self, now: float | None = None) -> list[str]:
        """Remove the jobs that finished more than keep_s ago; returns their ids."""
        now = time.time() if now is None else now
        gone = []
        for entry in self.root.iterdir() if self.root.is_dir() else ():
            status = self.read(entry.name)
            if status and status["state"] in FINAL and now - (status.get("finished") or now) > self.keep_s:
                self.delete(entry.name)
                gone.append(entry.name)
        return gone
