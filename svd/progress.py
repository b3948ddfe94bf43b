"""Where each job is, kept in a SQLite file that every worker of the server reads and writes.

With several workers, /progress may reach another worker than the one running the job;
BentoML's task results live in a SQLite file beside this one for the same reason.
"""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import astuple, fields
from pathlib import Path

from svd.generate import Progress

KEPT = 1000
COLUMNS = [spec.name for spec in fields(Progress)]


class ProgressStore:
    """The latest Progress of each job, by task id; the oldest beyond KEPT are dropped."""

    def __init__(self, path: Path | None = None):
        """None keeps it in this process's memory, for an engine without workers beside it."""
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, shared by the threads jobs report from, one at a time.
        self._db = sqlite3.connect(path or ":memory:", timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            # WAL: readers do not wait for the writer, and one writer at a time waits its turn.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS progress (key TEXT PRIMARY KEY, stage TEXT, step INTEGER, steps INTEGER,"
                " segment INTEGER, segments INTEGER, seq INTEGER)"
            )

    def put(self, key: str, progress: Progress) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM progress))",
                (key, *astuple(progress)),
            )
            self._db.execute("DELETE FROM progress WHERE seq <= (SELECT MAX(seq) FROM progress) - ?", (KEPT,))

    def get(self, key: str) -> Progress | None:
        with self._lock:
            row = self._db.execute(f"SELECT {', '.join(COLUMNS)} FROM progress WHERE key = ?", (key,)).fetchone()
        return None if row is None else Progress(*row)
