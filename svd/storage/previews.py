"""The folder of the running jobs' live previews, beside the kept videos.

With SVD_QUEUE_URL it is on the storage every replica shares, so any replica serves a
job's preview. Each preview is written under a temporary name and renamed (by the
generation core's Previewer, svd/core/preview.py), so a reader never sees half a file,
and removed when its job's generation ends, however it ends.

This module imports neither torch nor Pillow: the task routes use it in BentoML's front
process, which stays small (tests/test_front_door.py).
"""

from __future__ import annotations

import time
from pathlib import Path

from svd.base.ids import ID
from svd.storage.outputs import Outputs

CONTENT_TYPE = "image/webp"
SUFFIX = ".webp"


class Previews:
    """The folder of the running jobs' latest previews, one file per job id."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}{SUFFIX}"

    def start(self, job_id: str, max_age: float) -> Path:
        """Where the job starting now keeps its previews (for a Previewer); previews older than
        `max_age` seconds are removed on the way: their generation has ended, without removing
        them (its worker was killed)."""
        self._sweep(max_age)
        return self.path(job_id)

    def read(self, job_id: str) -> bytes | None:
        """The job's latest preview, whole; None when it has none."""
        if not ID.fullmatch(job_id):
            return None
        try:
            return self.path(job_id).read_bytes()
        except FileNotFoundError:
            return None

    def link(self, job_id: str, route: str) -> str | None:
        """Where ROUTE/preview serves the job's latest preview, None before its first. The
        address changes with each new preview, so a client fetches only new ones."""
        try:
            stat = self.path(job_id).stat()
        except FileNotFoundError:
            return None
        return f"{route}/preview?task_id={job_id}&v={stat.st_mtime_ns:x}-{stat.st_size:x}"

    def remove(self, job_id: str) -> None:
        self.path(job_id).unlink(missing_ok=True)

    def _sweep(self, max_age: float) -> None:
        oldest = time.time() - max_age
        for path in self.folder.iterdir():
            try:
                if path.stat().st_mtime < oldest:
                    path.unlink()
            except FileNotFoundError:
                continue  # removed meanwhile by its own worker


def previews_of(outputs: Outputs) -> Previews:
    """The previews folder beside a jobs' outputs folder: `previews/` in it."""
    return Previews(outputs.folder / "previews")
