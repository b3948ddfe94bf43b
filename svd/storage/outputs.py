"""Every video kept in SVD_OUTPUT_DIR, a folder or a bucket, with a JSON sidecar saying how it
was made.

A generation costs minutes of GPU; its file should outlive the request's temporary
directory and BentoML's task store, which is emptied at every start. The storage writes
each file whole or not at all (svd/storage/storage.py), and the sidecar is written after its
video: a reader finds a video only through its sidecar, so never one without it. The oldest
are pruned beyond SVD_OUTPUT_KEEP.
"""

from __future__ import annotations

import json
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from svd.base.errors import Refused
from svd.base.ids import ID
from svd.base.retention import Retention
from svd.storage.folder import Folder
from svd.storage.storage import Download, Entry, Storage, StorageFull, StorageUnavailable

logger = logging.getLogger(f"bentoml.{__name__}")
SIDECAR = ".json"
# A sidecar is a few KiB; more is not one of ours.
SIDECAR_LIMIT = 1 << 20
# How long a link handed out for a video (the webhook's output_url) may be used.
LINK_SECONDS = 24 * 3600
# A video this old without its sidecar was left by a save that failed half-way.
ABANDONED_SECONDS = 3600
# Seconds a client waits before asking again when the output store is unreachable.
UNAVAILABLE_RETRY_AFTER = 5


class Outputs:
    """The kept videos: save, find, list and prune, in a folder or a bucket."""

    def __init__(self, storage: Storage | Path, keep: Retention):
        self.storage = Folder(storage) if isinstance(storage, Path) else storage
        self.keep = keep

    def describe(self) -> str:
        """Where videos are kept and what prunes them, for the log at start."""
        limit = f"{self.keep.count} videos" if self.keep.count is not None else f"{self.keep.bytes} bytes"
        return f"SVD keeps videos in {self.storage.where}; it prunes the oldest beyond SVD_OUTPUT_KEEP ({limit}) there"

    def save(self, output_id: str, video: Path, record: dict[str, Any]) -> dict[str, Any]:
        """Keep the video under its id, and its record beside it; returns the record as kept."""
        record = {"id": output_id, "file": f"{output_id}{video.suffix}", **record}
        try:
            self.storage.write(record["file"], video)
            self.storage.write(f"{output_id}{SIDECAR}", json.dumps(record).encode())
        except OSError:
            try:
                self.storage.delete(record["file"])
            except OSError:
                pass  # unreachable: a video without its sidecar is never found, and `prune` removes it later
            raise
        self.prune()
        return record

    def put(self, output_id: str, video: Path, record: dict[str, Any]) -> dict[str, Any]:
        """`save`, with a full storage refused as 507 and an unreachable one as 503, and logged."""
        try:
            return self.save(output_id, video, record)
        except StorageFull as full:
            logger.error("SVD could not keep output %s: %s", output_id, full.strerror)
            raise Refused(HTTPStatus.INSUFFICIENT_STORAGE, "disk_full", f"{full.strerror}; nothing was kept") from None
        except StorageUnavailable as down:
            logger.error("SVD could not keep output %s: %s", output_id, down.strerror)
            raise Refused(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "storage_unavailable",
                f"{down.strerror}; nothing was kept",
                UNAVAILABLE_RETRY_AFTER,
            ) from None

    def remove(self, output_id: str) -> None:
        """Forget a video and its record: a job cancelled while its video was being kept."""
        if ID.fullmatch(output_id):
            for entry in self.storage.list():
                if Path(entry.name).stem == output_id:
                    self.storage.delete(entry.name)

    def find(self, output_id: str) -> tuple[Path | Download, dict[str, Any]] | None:
        """The video and record of a well-formed id, or None; other ids never reach the storage."""
        record = self.record(output_id)
        if record is None:
            return None
        video = self.storage.fetch(f"{output_id}{Path(record.get('file', '')).suffix}")
        return (video, record) if video is not None else None

    def record(self, output_id: str) -> dict[str, Any] | None:
        """How a kept video was made, without opening the video; None for an unknown or ill-formed id."""
        return self._record(f"{output_id}{SIDECAR}") if ID.fullmatch(output_id) else None

    def link(self, record: dict[str, Any]) -> str | None:
        """An expiring address of a kept video for anyone to fetch, where the storage has one."""
        return self.storage.link(record["file"], LINK_SECONDS)

    def recent(self, limit: int, offset: int = 0) -> list[dict[str, Any]]:
        """Records, newest first: one listing, and only the page's sidecars read."""
        records = []
        for sidecar in _sidecars(self.storage.list())[offset : offset + limit]:
            record = self._record(sidecar.name)
            if record is not None:  # None: pruned or being replaced meanwhile
                records.append(record)
        return records

    def prune(self) -> None:
        """Remove the oldest beyond what SVD_OUTPUT_KEEP allows. A file still being written has a
        temporary name, or is not yet an object, and is never counted; one being served stays
        readable, as POSIX keeps an open file's data until it is closed and S3 a started GET's."""
        # One listing, not one per output: there may be thousands.
        entries = self.storage.list()
        videos: dict[str, list[Entry]] = {}
        for entry in entries:
            name = Path(entry.name)
            if ID.fullmatch(name.stem) and name.suffix != SIDECAR:
                videos.setdefault(name.stem, []).append(entry)
        total = 0
        sidecars = _sidecars(entries)
        # A video whose sidecar could not follow it (the store went away meanwhile) is never
        # found; once no save can still be writing that sidecar, it goes.
        recorded = {Path(sidecar.name).stem for sidecar in sidecars}
        abandoned = time.time() - ABANDONED_SECONDS
        for stem, kept in videos.items():
            if stem not in recorded and all(entry.modified < abandoned for entry in kept):
                for entry in kept:
                    self.storage.delete(entry.name)
        for index, sidecar in enumerate(sidecars):
            kept = videos.get(Path(sidecar.name).stem, [])
            total += sum(entry.size for entry in kept)
            over_count = self.keep.count is not None and index >= self.keep.count
            over_bytes = self.keep.bytes is not None and total > self.keep.bytes and index > 0
            if over_count or over_bytes:
                for entry in (sidecar, *kept):
                    self.storage.delete(entry.name)

    def _record(self, name: str) -> dict[str, Any] | None:
        content = self.storage.read(name, SIDECAR_LIMIT)
        try:
            return json.loads(content) if content is not None else None
        except ValueError:
            return None


def _sidecars(entries: list[Entry]) -> list[Entry]:
    sidecars = [entry for entry in entries if entry.name.endswith(SIDECAR) and ID.fullmatch(Path(entry.name).stem)]
    return sorted(sidecars, key=lambda entry: entry.modified, reverse=True)
