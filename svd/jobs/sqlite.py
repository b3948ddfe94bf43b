"""The job store of one machine: an SQLite file that every worker of the server shares.

SQLite does the hard parts: a write transaction (BEGIN IMMEDIATE) is one writer at a
time across processes, so two idle workers never claim the same job, and a commit is
on disk before it returns (WAL, synchronous=FULL), so a job accepted is a job kept
through a crash. Leases are wall-clock times, which every process of the machine shares.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from svd.base.ids import new_id
from svd.base.progress import Progress
from svd.jobs.eta import learned, runs_of, speeds_of
from svd.jobs.fair import decayed, next_turn, turn_order
from svd.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    IDEMPOTENCY_SECONDS,
    IN_PROGRESS,
    INPUT_KEEP_BYTES,
    PENDING,
    QUEUED,
    RETENTION_SECONDS,
    Claim,
    Delivery,
    Idempotency,
    Job,
    JobStatus,
    KeyReused,
    QueueDepth,
    QueueFull,
    Speeds,
    Unfinished,
    UnknownJob,
    UserQueueFull,
    Webhook,
    image_hash,
    new_delivery_id,
)
from svd.jobs.webhooks.events import END, START, ended_body, started_body, wants

logger = logging.getLogger(f"bentoml.{__name__}")
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempt INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    lease_until REAL,
    image BLOB,
    image_name TEXT,
    controls TEXT,
    progress TEXT,
    error TEXT,
    error_status INTEGER
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    tries INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_by_due ON deliveries (due);
CREATE TABLE IF NOT EXISTS images (
    hash TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    size INTEGER NOT NULL,
    used REAL NOT NULL
);
-- Every change of a job's status or progress, for its event stream.
CREATE TABLE IF NOT EXISTS job_events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempt INTEGER NOT NULL,
    progress TEXT,
    error TEXT,
    error_status INTEGER
);
CREATE INDEX IF NOT EXISTS job_events_by_job ON job_events (id, seq);
CREATE TABLE IF NOT EXISTS idempotency_keys (
    key TEXT PRIMARY KEY,
    request TEXT NOT NULL,
    job_id TEXT NOT NULL,
    created REAL NOT NULL
);
-- Each owner's GPU seconds, as they counted when last recorded (svd/jobs/fair.py).
CREATE TABLE IF NOT EXISTS usage (
    owner TEXT PRIMARY KEY,
    seconds REAL NOT NULL,
    at REAL NOT NULL
);
-- Seconds per job of each size run, and per unit of work (svd/jobs/eta.py's runs_of).
CREATE TABLE IF NOT EXISTS speeds (
    size TEXT PRIMARY KEY,
    seconds REAL NOT NULL
);
"""
# Columns added since the first release, added to a file made before them.
ADDED_COLUMNS = {"webhook": "TEXT", "webhook_events": "TEXT", "image_hash": "TEXT", "owner": "TEXT NOT NULL DEFAULT ''"}
# A job's image: kept once by hash in `images`, or in its own row by a file from before that.
IMAGE = "COALESCE((SELECT data FROM images WHERE hash = jobs.image_hash), jobs.image)"
UNFINISHED = f"status IN ('{PENDING}', '{IN_PROGRESS}')"
JOB_COLUMNS = "id, status, created, started, finished, attempt, progress, error, error_status"
# A job as its record has it: with its owner, which its events leave out.
OWNED = f"{JOB_COLUMNS}, owner"
# Running jobs whose worker stopped renewing their lease.
LAPSED = f"status = '{IN_PROGRESS}' AND lease_until < :now"
# Only the worker holding the current attempt may act for a job.
HELD = f"id = :id AND attempt = :attempt AND status = '{IN_PROGRESS}'"
# Records a job's change in its event stream.
LOG = f"INSERT INTO job_events ({JOB_COLUMNS}) SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"


class SQLiteJobs:
    """svd.jobs.store.JobStore on an SQLite file for the `workers` of one server; `lease` is in seconds,
    `input_keep` the bytes of finished jobs' images kept for /retry."""

    def __init__(
        self, path: Path, lease: float = 30, attempts: int = 2, workers: int = 1, input_keep: int = INPUT_KEEP_BYTES
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.lease = lease
        self.input_keep = input_keep
        self.attempts = attempts
        self.workers = workers
        # One connection per store, used by one thread at a time.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(SCHEMA)
        # In one write transaction: the workers of a server open the file at the same moment.
        with self._transaction() as db:
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, **values: Any) -> tuple | None:
        with self._lock:
            return self._db.execute(sql, values).fetchone()

    def _update(self, sql: str, **values: Any) -> bool:
        """Whether the statement changed a row."""
        with self._lock:
            return self._db.execute(sql, values).rowcount > 0

    def submit(
        self,
        image: bytes,
        image_name: str,
        controls: dict[str, Any],
        per_worker: int,
        hook: Webhook | None = None,
        idempotency: Idempotency | None = None,
        owner: str = "",
        per_user: int = 0,
    ) -> Job:
        job = Job(new_id(), PENDING, time.time(), progress=Progress(), owner=owner)
        limit = per_worker * self.workers
        with self._transaction() as db:
            if idempotency is not None:
                db.execute("DELETE FROM idempotency_keys WHERE created < ?", (job.created - IDEMPOTENCY_SECONDS,))
                used = db.execute(
                    "SELECT request, job_id FROM idempotency_keys WHERE key = ?", (idempotency.key,)
                ).fetchone()
                if used is not None:
                    if used[0] != idempotency.request:
                        raise KeyReused(used[1])
                    first = _job(db.execute(f"SELECT {OWNED} FROM jobs WHERE id = ?", (used[1],)).fetchone())
                    if first is not None:
                        return first
                db.execute(
                    "INSERT OR REPLACE INTO idempotency_keys (key, request, job_id, created) VALUES (?, ?, ?, ?)",
                    (idempotency.key, idempotency.request, job.id, job.created),
                )
            (unfinished,) = db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE status IN ('{PENDING}', '{IN_PROGRESS}')"
            ).fetchone()
            owned = (
                db.execute(f"SELECT COUNT(*) FROM jobs WHERE {UNFINISHED} AND owner = ?", (owner,)).fetchone()[0]
                if per_user
                else 0
            )
            if unfinished >= limit or (per_user and owned >= per_user):
                last = db.execute(
                    f"SELECT finished - started FROM jobs WHERE status = '{COMPLETED}' ORDER BY finished DESC LIMIT 1"
                ).fetchone()
                if unfinished >= limit:
                    raise QueueFull(unfinished, limit, last and last[0])
                raise UserQueueFull(owned, per_user, last and last[0])
            digest = image_hash(image)
            db.execute(
                "INSERT INTO images (hash, data, size, used) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (hash) DO UPDATE SET used = excluded.used",
                (digest, image, len(image), job.created),
            )
            db.execute(
                "INSERT INTO jobs (id, status, created, image_hash, image_name, controls, progress, webhook,"
                " webhook_events, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    job.status,
                    job.created,
                    digest,
                    image_name,
                    json.dumps(controls),
                    QUEUED,
                    *_hook_columns(hook),
                    owner,
                ),
            )
            self._drop_images(db)
            db.execute(LOG, (job.id,))
        return job

    def _drop_images(self, db: sqlite3.Connection) -> None:
        """Drop images no job uses, and finished jobs' images beyond `input_keep`, least recently submitted first."""
        db.execute("DELETE FROM images WHERE hash NOT IN (SELECT image_hash FROM jobs WHERE image_hash IS NOT NULL)")
        (kept,) = db.execute("SELECT COALESCE(SUM(size), 0) FROM images").fetchone()
        spare = db.execute(
            f"SELECT hash, size FROM images WHERE hash NOT IN (SELECT image_hash FROM jobs WHERE {UNFINISHED}"
            " AND image_hash IS NOT NULL) ORDER BY used"
        )
        for digest, size in spare.fetchall():
            if kept <= self.input_keep:
                break
            db.execute("DELETE FROM images WHERE hash = ?", (digest,))
            kept -= size

    def claim(self, worker: str) -> Claim | None:
        now = time.time()
        # Most calls find nothing: look without taking the write lock first.
        waiting = f"SELECT id FROM jobs WHERE status = '{PENDING}' OR ({LAPSED}) LIMIT 1"
        if self._one(waiting, now=now) is None:
            return None
        with self._transaction() as db:
            given_up = db.execute(
                f"SELECT id, attempt, worker, started FROM jobs WHERE {LAPSED} AND attempt >= :attempts",
                {"now": now, "attempts": self.attempts},
            ).fetchall()
            for job_id, attempt, holder, started in given_up:
                error = (
                    f"the worker running this job stopped {attempt} times (killed, out of memory, or its machine "
                    "restarted); it is not tried again"
                )
                db.execute(
                    f"UPDATE jobs SET status = '{FAILED}', finished = ?, lease_until = NULL, error_status = 500,"
                    " error = ?"
                    " WHERE id = ?",
                    (now, error, job_id),
                )
                logger.warning(
                    "SVD job %s failed on %s, attempt %d, after %.1f s: %s",
                    job_id,
                    holder,
                    attempt,
                    now - started,
                    error,
                )
                db.execute(LOG, (job_id,))
                self._keep_delivery(db, job_id, END, ended_body(job_id, FAILED, error, attempt))
            # A job whose worker stopped comes first: it is older than any waiting one.
            job_id = db.execute(f"SELECT id FROM jobs WHERE {LAPSED} ORDER BY seq LIMIT 1", {"now": now}).fetchone()
            if job_id is None:
                job_id = self._fair_turn(db, now)
            if job_id is None:
                return None
            job_id, attempt, image, image_name, controls, owner = db.execute(
                f"SELECT id, attempt, {IMAGE}, image_name, controls, owner FROM jobs WHERE id = ?", job_id
            ).fetchone()
            db.execute(
                f"UPDATE jobs SET status = '{IN_PROGRESS}', attempt = :attempt, worker = :worker, started = :now,"
                " lease_until = :until, progress = :progress WHERE id = :id",
                {
                    "attempt": attempt + 1,
                    "worker": worker,
                    "now": now,
                    "until": now + self.lease,
                    "progress": QUEUED,
                    "id": job_id,
                },
            )
            self._keep_delivery(db, job_id, START, started_body(job_id, attempt + 1))
            db.execute(LOG, (job_id,))
        return Claim(job_id, attempt + 1, image, image_name, json.loads(controls), owner)

    def _fair_turn(self, db: sqlite3.Connection, now: float) -> tuple[str] | None:
        """The oldest waiting job of the owner with the least GPU time (svd/jobs/fair.py)."""
        queue = [
            Unfinished(job_id, JobStatus(status), started, {}, owner)
            for job_id, status, started, owner in db.execute(
                f"SELECT id, status, started, owner FROM jobs WHERE {UNFINISHED} ORDER BY seq"
            )
        ]
        job = next_turn(queue, db.execute("SELECT owner, seconds, at FROM usage").fetchall(), now)
        return None if job is None else (job.id,)

    def _charge(self, db: sqlite3.Connection, job_id: str, now: float) -> None:
        """Count the GPU time of a job that stops running now to its owner."""
        row = db.execute("SELECT owner, started FROM jobs WHERE id = ? AND started IS NOT NULL", (job_id,)).fetchone()
        if row is None:
            return
        owner, started = row
        kept = db.execute("SELECT seconds, at FROM usage WHERE owner = ?", (owner,)).fetchone()
        seconds = (decayed(*kept, now) if kept else 0.0) + max(0.0, now - started)
        db.execute("INSERT OR REPLACE INTO usage (owner, seconds, at) VALUES (?, ?, ?)", (owner, seconds, now))

    def renew(self, claim: Claim) -> bool:
        return self._update(
            f"UPDATE jobs SET lease_until = :until WHERE {HELD}",
            until=time.time() + self.lease,
            id=claim.id,
            attempt=claim.attempt,
        )

    def report(self, claim: Claim, progress: Progress) -> bool:
        with self._transaction() as db:
            held = (
                db.execute(
                    f"UPDATE jobs SET progress = :progress, lease_until = :until WHERE {HELD}",
                    {
                        "progress": json.dumps(asdict(progress)),
                        "until": time.time() + self.lease,
                        "id": claim.id,
                        "attempt": claim.attempt,
                    },
                ).rowcount
                > 0
            )
            if held:
                db.execute(LOG, (claim.id,))
        return held

    def finish(
        self,
        claim: Claim,
        status: str,
        error: str | None = None,
        error_status: int | None = None,
        ended: bytes | None = None,
    ) -> bool:
        now = time.time()
        with self._transaction() as db:
            updated = db.execute(
                "UPDATE jobs SET status = :status, finished = :now, lease_until = NULL, error = :error,"
                f" error_status = :error_status WHERE {HELD}",
                {
                    "status": status,
                    "now": now,
                    "error": error,
                    "error_status": error_status,
                    "id": claim.id,
                    "attempt": claim.attempt,
                },
            )
            if updated.rowcount == 1:
                db.execute(LOG, (claim.id,))
                self._charge(db, claim.id, now)
                if ended is not None:
                    self._keep_delivery(db, claim.id, END, ended)
            db.execute(
                f"DELETE FROM jobs WHERE status IN ('{COMPLETED}', '{FAILED}', '{CANCELED}') AND finished < ?",
                (now - RETENTION_SECONDS,),
            )
            db.execute(
                "DELETE FROM job_events WHERE created < ? AND id NOT IN (SELECT id FROM jobs)",
                (now - RETENTION_SECONDS,),
            )
        return updated.rowcount == 1

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        with self._transaction() as db:
            job = _job(db.execute(f"SELECT {OWNED} FROM jobs WHERE id = ?", (job_id,)).fetchone())
            if job is None:
                raise UnknownJob(job_id)
            if job.status not in (PENDING, IN_PROGRESS):
                return job, False
            now = time.time()
            if job.status == IN_PROGRESS:
                self._charge(db, job_id, now)
            db.execute(
                f"UPDATE jobs SET status = '{CANCELED}', finished = ?, lease_until = NULL WHERE id = ?",
                (now, job_id),
            )
            db.execute(LOG, (job_id,))
            self._keep_delivery(db, job_id, END, ended_body(job_id, CANCELED, None, job.attempt))
            return _job(db.execute(f"SELECT {OWNED} FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get(self, job_id: str) -> Job | None:
        return _job(self._one(f"SELECT {OWNED} FROM jobs WHERE id = :id", id=job_id))

    def live_workers(self) -> int:
        # The server's own workers: with SQLite they run in the server that answers, so they are there.
        return self.workers

    def input(self, job_id: str) -> tuple[bytes, str, dict[str, Any]] | None:
        row = self._one(f"SELECT {IMAGE}, image_name, controls FROM jobs WHERE id = :id", id=job_id)
        return None if row is None or row[0] is None else (row[0], row[1], json.loads(row[2]))

    def depth(self) -> QueueDepth:
        with self._lock:
            rows = self._db.execute(
                f"SELECT owner, COUNT(*) FILTER (WHERE status = '{PENDING}'),"
                f" COUNT(*) FILTER (WHERE status = '{IN_PROGRESS}'), MIN(created) FILTER (WHERE status = '{PENDING}')"
                f" FROM jobs WHERE {UNFINISHED} GROUP BY owner"
            ).fetchall()
        oldest = min((row[3] for row in rows if row[3] is not None), default=None)
        return QueueDepth(
            sum(row[1] for row in rows),
            sum(row[2] for row in rows),
            0.0 if oldest is None else max(0.0, time.time() - oldest),
            {owner: (waiting, running) for owner, waiting, running, _ in rows},
        )

    def events(self, job_id: str, after: str | None = None) -> list[tuple[str, Job]]:
        seen = int(after) if after and after.isdigit() else 0
        with self._lock:
            rows = self._db.execute(
                f"SELECT seq, {JOB_COLUMNS} FROM job_events WHERE id = ? AND seq > ? ORDER BY seq", (job_id, seen)
            ).fetchall()
        return [(str(seq), _job(row)) for seq, *row in rows]

    def unfinished(self) -> list[Unfinished]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, status, started, controls, owner, created FROM jobs WHERE {UNFINISHED}"
                f" ORDER BY status = '{PENDING}', started, seq"
            ).fetchall()
            kept = self._db.execute("SELECT owner, seconds, at FROM usage").fetchall()
        queue = [
            Unfinished(job_id, JobStatus(status), started, json.loads(data), owner, created)
            for job_id, status, started, data, owner, created in rows
        ]
        return turn_order(queue, kept, self.speeds(), time.time())

    def learn(self, size: str, work: float, seconds: float, turn_seconds: float | None = None) -> None:
        with self._transaction() as db:
            for key, value in runs_of(size, work, seconds, turn_seconds):
                old = db.execute("SELECT seconds FROM speeds WHERE size = ?", (key,)).fetchone()
                db.execute(
                    "INSERT OR REPLACE INTO speeds (size, seconds) VALUES (?, ?)",
                    (key, learned(old and old[0], value)),
                )

    def speeds(self) -> Speeds:
        with self._lock:
            return speeds_of(dict(self._db.execute("SELECT size, seconds FROM speeds").fetchall()))

    def reachable(self) -> bool:
        return True

    def notify(self, job_id: str, event: str, body: bytes) -> bool:
        with self._transaction() as db:
            return self._keep_delivery(db, job_id, event, body)

    def _keep_delivery(self, db: sqlite3.Connection, job_id: str, event: str, body: bytes) -> bool:
        row = db.execute("SELECT webhook, webhook_events FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or not row[0] or not wants(row[1], event):
            return False
        db.execute(
            "INSERT INTO deliveries (id, job_id, url, body, due) VALUES (?, ?, ?, ?, ?)",
            (new_delivery_id(), job_id, row[0], body, time.time()),
        )
        return True

    def next_delivery(self, lease: float) -> Delivery | None:
        now = time.time()
        if self._one("SELECT 1 FROM deliveries WHERE due <= :now LIMIT 1", now=now) is None:
            return None
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, job_id, url, body, tries FROM deliveries WHERE due <= ? ORDER BY due LIMIT 1", (now,)
            ).fetchone()
            if row is None:
                return None
            # Held by moving its due time past the try: a worker that dies mid-try leaves it due again.
            db.execute("UPDATE deliveries SET due = ? WHERE id = ?", (now + lease, row[0]))
        return Delivery(row[0], row[1], row[2], bytes(row[3]), row[4])

    def retry_delivery(self, delivery_id: str, tries: int, due: float) -> None:
        self._update(
            "UPDATE deliveries SET tries = :tries, due = :due WHERE id = :id", tries=tries, due=due, id=delivery_id
        )

    def delivered(self, delivery_id: str) -> None:
        self._update("DELETE FROM deliveries WHERE id = :id", id=delivery_id)


def _hook_columns(hook: Webhook | None) -> tuple[str | None, str]:
    return (hook.url, ",".join(hook.events)) if hook else (None, "")


def _job(row: tuple | None) -> Job | None:
    if row is None:
        return None
    job_id, status, created, started, finished, attempt, progress, error, error_status, *owner = row
    return Job(
        job_id,
        JobStatus(status),
        created,
        started,
        finished,
        attempt,
        Progress(**json.loads(progress)) if progress else None,
        error,
        error_status,
        owner[0] if owner else "",
    )
