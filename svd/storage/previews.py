"""The running jobs' live previews, in `previews/` beside the kept videos (a folder or a bucket).

With SVD_QUEUE_URL it is on the storage every replica shares, so any replica serves a
job's preview. Each preview is written whole or not at all (svd/storage/storage.py), so a
reader never sees half a file, and removed when its job's generation ends, however it ends.

This module imports neither torch nor Pillow: the task routes use it in BentoML's front
process, which stays small (tests/test_front_door.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from svd.base.ids import ID
from svd.storage.folder import Folder
from svd.storage.outputs import Outputs
from svd.storage.storage import Storage

logger = logging.getLogger(f"bentoml.{__name__}")

CONTENT_TYPE = "image/webp"
SUFFIX = ".webp"
# An animated WebP of a preview's size is tens of KiB; more is not one of ours.
PREVIEW_LIMIT = 16 << 20


class Previews:
    """The running jobs' latest previews, one file per job id."""

    def __init__(self, storage: Storage | Path):
        self.storage = Folder(storage) if isinstance(storage, Path) else storage

    def start(self, job_id: str, max_age: float) -> Callable[[bytes], None]:
        """What keeps the previews of the job starting now (for a Previewer); previews older than
        `max_age` seconds are removed on the way: their generation has ended, without removing
        them (its worker was killed)."""
        try:
            self._sweep(max_age)
        except OSError as exc:
            logger.warning("SVD could not remove old previews from %s: %s", self.storage.where, exc)
        return partial(self.storage.write, f"{job_id}{SUFFIX}")

    def read(self, job_id: str) -> bytes | None:
        """The job's latest preview, whole; None when it has none."""
        return self.storage.read(f"{job_id}{SUFFIX}", PREVIEW_LIMIT) if ID.fullmatch(job_id) else None

    def link(self, job_id: str, route: str) -> str | None:
        """Where ROUTE/preview serves the job's latest preview, None before its first or while the
        storage cannot say. The address changes with each new preview, so a client fetches only new ones."""
        try:
            entry = self.storage.stat(f"{job_id}{SUFFIX}")
        except OSError:
            return None
        return f"{route}/preview?task_id={job_id}&v={entry.version}" if entry else None

    def remove(self, job_id: str) -> None:
        try:
            self.storage.delete(f"{job_id}{SUFFIX}")
        except OSError as exc:
            logger.warning("SVD could not remove the preview of job %s (swept later): %s", job_id, exc)

    def _sweep(self, max_age: float) -> None:
        oldest = time.time() - max_age
        for entry in self.storage.list():
            if entry.modified < oldest:
                self.storage.delete(entry.name)


def previews_of(outputs: Outputs) -> Previews:
    """The previews beside a jobs' outputs: `previews/` in their folder or bucket prefix."""
    return Previews(outputs.storage.child("previews"))
