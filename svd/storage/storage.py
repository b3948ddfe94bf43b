"""Where kept videos and previews live: a local folder or an S3-compatible bucket, behind one
small interface, so that Outputs and Previews work on either (SVD_OUTPUT_DIR).

A name is a file name relative to the storage's root (`<id>.mp4`); `child` is a sub-folder
(a prefix in a bucket). Every write is all-or-nothing: a reader finds the whole content or
none of it. Both backends raise OSError subclasses, so that callers that already tolerate a
full or missing disk (the previews) tolerate an unreachable bucket alike.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

BUCKET_SCHEME = "s3://"


class StorageFull(OSError):
    """The storage refused a write for space or quota; nothing of it was left there."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)


class StorageUnavailable(OSError):
    """The storage could not be reached, or answered with an error, within its deadline."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


@dataclass(frozen=True)
class Entry:
    """A stored file: `version` changes with each write of it."""

    name: str
    size: int
    modified: float
    version: str


@dataclass
class Download:
    """A stored file being read, for streaming it out: `chunks` ends with the file; `close` frees
    the connection when it is not read to the end."""

    size: int
    chunks: Iterator[bytes]
    close: Callable[[], None]


class Storage(Protocol):
    """The few operations Outputs and Previews need, implemented by each backend."""

    where: str  # how messages and the log name it: a path, or s3://bucket/prefix without credentials

    def write(self, name: str, content: Path | bytes) -> None:
        """Keep a file's copy or bytes under `name`, all or nothing."""

    def read(self, name: str, limit: int) -> bytes | None:
        """The first `limit` bytes at most of a file; None when there is none."""

    def fetch(self, name: str) -> Path | Download | None:
        """A file to serve: its local path, or a download of it; None when there is none."""

    def stat(self, name: str) -> Entry | None:
        """What is known of a file without reading it; None when there is none."""

    def list(self) -> list[Entry]:
        """The files at the root, not in sub-folders, in one listing."""

    def delete(self, name: str) -> None:
        """Remove a file; one already gone is no error."""

    def move(self, name: str, target: str) -> None:
        """Put the file `name` at `target`, replacing what was there in one step; `name` goes."""

    def link(self, name: str, seconds: int) -> str | None:
        """An address anyone may GET the file from for `seconds`, or None where the storage has none."""

    def child(self, name: str) -> Storage:
        """The sub-folder `name`."""
