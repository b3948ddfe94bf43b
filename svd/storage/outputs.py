"""Every video kept in SVD_OUTPUT_DIR, a folder or a bucket, with a JSON sidecar saying how it
was made.

A generation costs minutes of GPU; its file should outlive the request's temporary
directory and BentoML's task store, which is emptied at every start. The storage writes
each file whole or not at all (svd/storage/storage.py), and the sidecar is written after its
video: a reader finds a video only through its sidecar, so never one without it. The oldest
are pruned beyond SVD_OUTPUT_KEEP.

A job's video is written under its id and attempt, and promoted to its id once the store
says that attempt ended the job: an attempt that lost its job (its lease lapsed and another
worker's attempt won) removes only its own file, never the winner's. Temporary files and
attempts' files that a crash left are removed once older than any write can take.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from http import HTTPStatus
from pathlib import Path
from typing import Any

from svd.base.errors import Refused
from svd.base.ids import ID
from svd.base.retention import Retention
from svd.base.users import NOBODY, OPEN, Caller
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
# An attempt's files are named {id}~{attempt}: never an id, so never listed, served or pruned as one.
ATTEMPT = "~"
# Temporary and attempts' files older than this were left by a crash.
LEFT_SECONDS = 24 * 3600
# Sidecars whose owner is remembered, at most: a few MiB.
OWNERS_KEPT = 100_000


class Outputs:
    """The kept videos: save, find, list and prune, in a folder or a bucket."""

    def __init__(self, storage: Storage | Path, keep: Retention):
        self.storage = Folder(storage) if isinstance(storage, Path) else storage
        self.keep = keep
        # Each sidecar's owner, by its name and time: a sidecar never changes once written, so a
        # user's list reads only the sidecars it has not read before.
        self._owners: dict[tuple[str, float], str] = {}

    def describe(self) -> str:
        """Where videos are kept and what prunes them, for the log at start."""
        limit = f"{self.keep.count} videos" if self.keep.count is not None else f"{self.keep.bytes} bytes"
        return f"SVD keeps videos in {self.storage.where}; it prunes the oldest beyond SVD_OUTPUT_KEEP ({limit}) there"

    def save(
        self, output_id: str, video: Path, record: dict[str, Any], attempt: int | None = None
    ) -> dict[str, Any]:
        """Keep the video under its id, or under its id and `attempt` until `promote`, and its
        record beside it; returns the record as kept."""
        record = {"id": output_id, "file": f"{output_id}{video.suffix}", **record}
        stem = _stem(output_id, attempt)
        try:
            self.storage.write(f"{stem}{video.suffix}", video)
            self.storage.write(f"{stem}{SIDECAR}", json.dumps(record).encode())
        except OSError:
            try:
                self.storage.delete(f"{stem}{video.suffix}")
            except OSError:
                pass  # unreachable: a video without its sidecar is never found, and `prune` removes it later
            raise
        self.prune()
        return record

    def put(
        self, output_id: str, video: Path, record: dict[str, Any], attempt: int | None = None
    ) -> dict[str, Any]:
        """`save`, with a full storage refused as 507 and an unreachable one as 503, and logged."""
        try:
            return self.save(output_id, video, record, attempt)
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

    def promote(self, output_id: str, attempt: int) -> None:
        """Make the attempt's video the id's: the store says this attempt ended the job. The
        sidecar moves last, so a reader never finds it without its video."""
        stem = _stem(output_id, attempt)
        record = self._record(f"{stem}{SIDECAR}")
        if record is None:
            return  # promoted already, by a reader that found the job's video missing
        self.storage.move(f"{stem}{Path(record['file']).suffix}", record["file"])
        self.storage.move(f"{stem}{SIDECAR}", f"{output_id}{SIDECAR}")
        self.prune()

    def remove(self, output_id: str, attempt: int | None = None) -> None:
        """Forget a video and its record, or only the attempt's: a job cancelled while its video
        was being kept, or taken by another attempt."""
        if ID.fullmatch(output_id):
            for entry in self.storage.list():
                if Path(entry.name).stem == _stem(output_id, attempt):
                    self.storage.delete(entry.name)

    def find(self, output_id: str, caller: Caller = OPEN) -> tuple[Path | Download, dict[str, Any]] | None:
        """The video and record of a well-formed id that `caller` may see, or None; other ids never
        reach the storage."""
        record = self.record(output_id)
        if record is None or not caller.sees(record.get("owner", NOBODY)):
            return None
        video = self.storage.fetch(f"{output_id}{Path(record.get('file', '')).suffix}")
        return (video, record) if video is not None else None

    def find_job(self, job_id: str, attempt: int) -> tuple[Path | Download, dict[str, Any]] | None:
        """A completed job's video, promoted first where the worker whose attempt ended the job
        stopped between the store's finish and the promotion."""
        found = self.find(job_id)
        if found is None and attempt:
            with contextlib.suppress(FileNotFoundError):  # another reader promoted it meanwhile
                self.promote(job_id, attempt)
            found = self.find(job_id)
        return found

    def record(self, output_id: str) -> dict[str, Any] | None:
        """How a kept video was made, without opening the video; None for an unknown or ill-formed id."""
        return self._record(f"{output_id}{SIDECAR}") if ID.fullmatch(output_id) else None

    def link(self, file: str) -> str | None:
        """An expiring address of a kept video (its record's `file`) for anyone to fetch, where the
        storage has one."""
        return self.storage.link(file, LINK_SECONDS)

    def recent(self, limit: int, offset: int = 0, owner: str | None = None) -> list[dict[str, Any]]:
        """Records, newest first, of `owner` only unless None: one listing, and only the page's
        sidecars read, besides those of others' videos never read before."""
        sidecars = _sidecars(self.storage.list())
        if owner is not None:
            sidecars = [sidecar for sidecar in sidecars if self._owner(sidecar) == owner]
        records = []
        for sidecar in sidecars[offset : offset + limit]:
            record = self._record(sidecar.name)
            if record is not None:  # None: pruned or being replaced meanwhile
                records.append(record)
        return records

    def _owner(self, sidecar: Entry) -> str | None:
        """Who made the sidecar's video: its record's owner ('' before users), None when it is gone."""
        key = (sidecar.name, sidecar.modified)
        if key not in self._owners:
            record = self._record(sidecar.name)
            if record is None:
                return None
            if len(self._owners) > OWNERS_KEPT:
                self._owners.clear()
            self._owners[key] = record.get("owner", NOBODY)
        return self._owners[key]

    def prune(self) -> None:
        """Remove the oldest beyond what SVD_OUTPUT_KEEP allows. A file still being written has a
        temporary name, or is not yet an object, and is never counted; one being served stays
        readable, as POSIX keeps an open file's data until it is closed and S3 a started GET's."""
        # One listing, not one per output: there may be thousands.
        entries = self.storage.list()
        videos: dict[str, list[Entry]] = {}
        left_before = time.time() - LEFT_SECONDS
        for entry in entries:
            name = Path(entry.name)
            if ID.fullmatch(name.stem) and name.suffix != SIDECAR:
                videos.setdefault(name.stem, []).append(entry)
            elif (name.suffix == ".part" or ATTEMPT in name.stem) and entry.modified < left_before:
                self.storage.delete(entry.name)
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


def _stem(output_id: str, attempt: int | None) -> str:
    return output_id if attempt is None else f"{output_id}{ATTEMPT}{attempt}"


def _sidecars(entries: list[Entry]) -> list[Entry]:
    sidecars = [entry for entry in entries if entry.name.endswith(SIDECAR) and ID.fullmatch(Path(entry.name).stem)]
    return sorted(sidecars, key=lambda entry: entry.modified, reverse=True)
