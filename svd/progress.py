"""Where each job is, kept in a SQLite file that every worker of the server reads and writes.

With several workers, /progress may reach another worker than the one running the job;
BentoML's task results live in a SQLite file beside this one for the same reason.
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from dataclasses import astuple, fields
from pathlib import Path

from svd.generate import Progress

KEPT = 1000
COLUMNS = [spec.name for spec in fields(Progress)]


class ProgressStore:
    """The latest Progress of each job, by task id; the oldest beyond KEPT are dropped."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            # WAL: readers do not wait for the writer, and one writer at a time waits its turn.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS progress (key TEXT PRIMARY KEY, stage TEXT, step INTEGER, steps INTEGER,"
                " segment INTEGER, segments INTEGER, seq INTEGER)"
            )

    def _connect(self) -> sqlite3.Connection:
        # A connection per call: jobs report from their own threads.
        return closing(sqlite3.connect(self.path, timeout=30, isolation_level=None))  # type: ignore[return-value]

    def put(self, key: str, progress: Progress) -> None:
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO progress VALUES (?, ?, ?, ?, ?, ?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM progress))",
                (key, *astuple(progress)),
            )
            db.execute("DELETE FROM progress WHERE seq <= (SELECT MAX(seq) FROM progress) - ?", (KEPT,))

    def get(self, key: str) -> Progress | None:
        with self._connect() as db:
            row = db.execute(f"SELECT {', '.join(COLUMNS)} FROM progress WHERE key = ?", (key,)).fetchone()
        return None if row is None else Progress(*row)
