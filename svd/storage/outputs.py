"""Every video kept in a folder (SVD_OUTPUT_DIR), with a JSON sidecar saying how it was made.

A generation costs minutes of GPU; its file should outlive the request's temporary
directory and BentoML's task store, which is emptied at every start. Files are written
under a temporary name and renamed, so the folder never holds half a video, and the
oldest are pruned beyond SVD_OUTPUT_KEEP.

A job's video is written under its id and attempt, and promoted to its id once the store
says that attempt ended the job: an attempt that lost its job (its lease lapsed and another
worker's attempt won) removes only its own file, never the winner's. Temporary files and
attempts' files that a crash left are removed once older than any write can take.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from svd.base.errors import Refused
from svd.base.ids import ID
from svd.base.retention import Retention

logger = logging.getLogger(f"bentoml.{__name__}")
SIDECAR = ".json"
# An attempt's files are named {id}~{attempt}: never an id, so never listed, served or pruned as one.
ATTEMPT = "~"
# Temporary and attempts' files older than this were left by a crash.
LEFT_SECONDS = 24 * 3600


class DiskFull(OSError):
    """The output folder's disk is full; nothing of the video was left there."""


class Outputs:
    """The output folder: save, find, list and prune."""

    def __init__(self, folder: Path, keep: Retention):
        self.folder = folder
        self.keep = keep
        folder.mkdir(parents=True, exist_ok=True)

    def save(
        self, output_id: str, video: Path, record: dict[str, Any], attempt: int | None = None
    ) -> dict[str, Any]:
        """Keep the video under its id, or under its id and `attempt` until `promote`, and its
        record beside it; returns the record as kept."""
        record = {"id": output_id, "file": f"{output_id}{video.suffix}", **record}
        stem = _stem(output_id, attempt)
        try:
            write_atomically(self.folder / f"{stem}{video.suffix}", video)
            write_atomically(self.folder / f"{stem}{SIDECAR}", json.dumps(record).encode())
        except OSError as exc:
            (self.folder / f"{stem}{video.suffix}").unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    exc.errno, f"the disk of SVD_OUTPUT_DIR ({self.folder}) is full: {exc.strerror}"
                ) from None
            raise
        self.prune()
        return record

    def put(self, output_id: str, video: Path, record: dict[str, Any], attempt: int | None = None) -> None:
        """`save`, with a full disk refused as 507 and logged."""
        try:
            self.save(output_id, video, record, attempt)
        except DiskFull as full:
            logger.error("SVD could not keep output %s: %s", output_id, full.strerror)
            raise Refused(HTTPStatus.INSUFFICIENT_STORAGE, "disk_full", f"{full.strerror}; nothing was kept") from None

    def promote(self, output_id: str, attempt: int) -> None:
        """Make the attempt's video the id's: the store says this attempt ended the job."""
        stem = _stem(output_id, attempt)
        record = json.loads((self.folder / f"{stem}{SIDECAR}").read_text())
        suffix = Path(record["file"]).suffix
        os.replace(self.folder / f"{stem}{suffix}", self.folder / record["file"])
        os.replace(self.folder / f"{stem}{SIDECAR}", self.folder / f"{output_id}{SIDECAR}")
        self.prune()

    def remove(self, output_id: str, attempt: int | None = None) -> None:
        """Forget a video and its record, or only the attempt's: a job cancelled while its video
        was being kept, or taken by another attempt."""
        for path in self.folder.glob(f"{_stem(output_id, attempt)}.*") if ID.fullmatch(output_id) else ():
            path.unlink(missing_ok=True)

    def find(self, output_id: str) -> tuple[Path, dict[str, Any]] | None:
        """The video and record of a well-formed id, or None; other ids never reach the file system."""
        if not ID.fullmatch(output_id):
            return None
        try:
            record = json.loads((self.folder / f"{output_id}{SIDECAR}").read_text())
        except (OSError, ValueError):
            return None
        video = self.folder / f"{output_id}{Path(record.get('file', '')).suffix}"
        return (video, record) if video.is_file() else None

    def recent(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        """Records, newest first."""
        records = []
        for sidecar in self._sidecars()[offset : offset + limit]:
            try:
                records.append(json.loads(sidecar.read_text()))
            except (OSError, ValueError):
                continue  # pruned or being replaced meanwhile
        return records

    def prune(self) -> None:
        """Remove the oldest beyond what SVD_OUTPUT_KEEP allows. A file still being written has a
        temporary name and is never counted; one being served stays readable, as POSIX keeps an
        open file's data until it is closed."""
        # One listing of the folder, not one per output: it may hold thousands.
        videos: dict[str, list[Path]] = {}
        left_before = time.time() - LEFT_SECONDS
        for path in self.folder.iterdir():
            if ID.fullmatch(path.stem) and path.suffix != SIDECAR:
                videos.setdefault(path.stem, []).append(path)
            elif (path.suffix == ".part" or ATTEMPT in path.stem) and _modified(path) < left_before:
                path.unlink(missing_ok=True)
        total = 0
        for index, sidecar in enumerate(self._sidecars()):
            kept = videos.get(sidecar.stem, [])
            total += sum(path.stat().st_size for path in kept if path.exists())
            over_count = self.keep.count is not None and index >= self.keep.count
            over_bytes = self.keep.bytes is not None and total > self.keep.bytes and index > 0
            if over_count or over_bytes:
                sidecar.unlink(missing_ok=True)
                for path in kept:
                    path.unlink(missing_ok=True)

    def _sidecars(self) -> list[Path]:
        sidecars = [path for path in self.folder.glob(f"*{SIDECAR}") if ID.fullmatch(path.stem)]
        return sorted(sidecars, key=_modified, reverse=True)


def _stem(output_id: str, attempt: int | None) -> str:
    return output_id if attempt is None else f"{output_id}{ATTEMPT}{attempt}"


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def write_atomically(path: Path, content: Path | bytes) -> None:
    """Write a file's copy or bytes through a temporary file in the same folder, then rename:
    never half a file."""
    fd, part = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as sink:
            if isinstance(content, bytes):
                sink.write(content)
            else:
                with content.open("rb") as source:
                    shutil.copyfileobj(source, sink)
        os.replace(part, path)
    except BaseException:
        Path(part).unlink(missing_ok=True)
        raise
