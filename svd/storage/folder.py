"""The local folder backend of svd/storage/storage.py: SVD_OUTPUT_DIR as a path.

Files are written under a temporary name in the same folder and renamed, so the folder
never holds half a file; the temporary names start with a dot and end in .part.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from svd.storage.storage import Entry, StorageFull


class Folder:
    """Files in a local folder (created if missing)."""

    def __init__(self, path: Path):
        self.path = path
        self.where = str(path)
        path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, content: Path | bytes) -> None:
        try:
            write_atomically(self.path / name, content)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StorageFull(f"the disk of SVD_OUTPUT_DIR ({self.where}) is full: {exc.strerror}") from None
            raise

    def read(self, name: str, limit: int) -> bytes | None:
        try:
            with (self.path / name).open("rb") as file:
                return file.read(limit)
        except FileNotFoundError:
            return None

    def fetch(self, name: str) -> Path | None:
        path = self.path / name
        return path if path.is_file() else None

    def stat(self, name: str) -> Entry | None:
        try:
            stat = (self.path / name).stat()
        except FileNotFoundError:
            return None
        return Entry(name, stat.st_size, stat.st_mtime, f"{stat.st_mtime_ns:x}-{stat.st_size:x}")

    def list(self) -> list[Entry]:
        entries = []
        for path in self.path.iterdir():
            entry = self.stat(path.name) if path.is_file() else None
            if entry is not None:  # None: a file removed meanwhile
                entries.append(entry)
        return entries

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def move(self, name: str, target: str) -> None:
        os.replace(self.path / name, self.path / target)

    def link(self, name: str, seconds: int) -> None:
        return None  # served only through the service's own routes

    def child(self, name: str) -> Folder:
        return Folder(self.path / name)


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
