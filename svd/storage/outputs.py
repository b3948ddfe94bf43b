"""Every video kept in a folder (SVD_OUTPUT_DIR), with a JSON sidecar saying how it was made.

A generation costs minutes of GPU; its file should outlive the request's temporary
directory and BentoML's task store, which is emptied at every start. Files are written
under a temporary name and renamed, so the folder never holds half a video, and the
oldest are pruned beyond SVD_OUTPUT_KEEP.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from http import HTTPStatus
from pathlib import Path
from typing import Any

from svd.base.errors import Refused
from svd.base.ids import ID
from svd.base.retention import Retention

logger = logging.getLogger(f"bentoml.{__name__}")
SIDECAR = ".json"


class DiskFull(OSError):
    """The output folder's disk is full; nothing of the video was left there."""


class Outputs:
    """The output folder: save, find, list and prune."""

    def __init__(self, folder: Path, keep: Retention):
        self.folder = folder
        self.keep = keep
        folder.mkdir(parents=True, exist_ok=True)

    def save(self, output_id: str, video: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Keep the video under its id, and its record beside it; returns the record as kept."""
        record = {"id": output_id, "file": f"{output_id}{video.suffix}", **record}
        try:
            write_atomically(self.folder / record["file"], video)
            write_atomically(self.folder / f"{output_id}{SIDECAR}", json.dumps(record).encode())
        except OSError as exc:
            (self.folder / record["file"]).unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(
                    exc.errno, f"the disk of SVD_OUTPUT_DIR ({self.folder}) is full: {exc.strerror}"
                ) from None
            raise
        self.prune()
        return record

    def put(self, output_id: str, video: Path, record: dict[str, Any]) -> None:
        """`save`, with a full disk refused as 507 and logged."""
        try:
            self.save(output_id, video, record)
        except DiskFull as full:
            logger.error("SVD could not keep output %s: %s", output_id, full.strerror)
            raise Refused(HTTPStatus.INSUFFICIENT_STORAGE, "disk_full", f"{full.strerror}; nothing was kept") from None

    def remove(self, output_id: str) -> None:
        """Forget a video and its record: a job cancelled while its video was being kept."""
        for path in self.folder.glob(f"{output_id}.*") if ID.fullmatch(output_id) else ():
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
        for path in self.folder.iterdir():
            if ID.fullmatch(path.stem) and path.suffix != SIDECAR:
                videos.setdefault(path.stem, []).append(path)
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
