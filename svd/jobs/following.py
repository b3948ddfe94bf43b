"""Following a job: what /progress, /generate_task/status and ROUTE/events say of it, built here
once so that they never disagree, and the server-sent events of ROUTE/events.

The events are read from the job store, so any replica streams a job that runs on another.
Each event's data is what /progress answers (progress_of). Its id says what the client has
seen: the store's last recorded change of the job, its queue position and its preview; a
client that reconnects with it in Last-Event-ID gets the changes recorded since and nothing
twice. A new follower starts from the job's current state: a finished job's end, at once.
The stream ends after the end (completed, failed or canceled).

No thread is held per stream: each stream is a coroutine that reads the store every
POLL_SECONDS in one of the threads that every stream of the process shares (READERS), and
its HTTP route stops it as soon as its client goes away.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import anyio.to_thread

from svd.base.progress import Progress
from svd.jobs.eta import Place, place
from svd.jobs.model import COMPLETED, FINISHED, IN_PROGRESS, Job, Speeds, Unfinished
from svd.jobs.store import JobStore
from svd.storage.previews import Previews

# How stale the queue behind the positions and ETAs may be: one read of the store serves every
# request and stream of this process meanwhile.
REFRESH_SECONDS = 0.5


class QueuePlaces:
    """Each job's queue position and ETA (svd/jobs/eta.py), from the store `store()` opens."""

    def __init__(self, store: Callable[[], JobStore]):
        self._store = store
        self._lock = threading.Lock()
        self._read_at = -math.inf
        self._queue: list[Unfinished] = []
        self._speeds = Speeds({}, None)
        self._workers = 0

    def of(self, job: Job) -> Place:
        """The place of an unfinished job: from the queue as last read, unless that is older than
        REFRESH_SECONDS or disagrees with the job's own record (it started, or was just submitted,
        since), which the queue is then read again for."""
        with self._lock:
            known = next((queued.status for queued in self._queue if queued.id == job.id), None)
            if time.monotonic() - self._read_at >= REFRESH_SECONDS or known != job.status:
                store = self._store()
                self._queue, self._speeds, self._workers = store.unfinished(), store.speeds(), store.live_workers()
                self._read_at = time.monotonic()
            queue, speeds, workers = self._queue, self._speeds, self._workers
        return place(job.id, queue, speeds, time.time(), workers)


# What /generate_task/status adds to BentoML's task status, from progress_of.
QUEUE_FIELDS = ("queue_position", "eta_seconds", "waiting_for")


def progress_of(job: Job, places: QueuePlaces, previews: Previews, route: str) -> dict[str, Any]:
    """Where the job is: its status, stage, step and segment, its live preview's address, its queue
    position and ETA, what it waits for ("worker": no worker takes jobs now), and how it ended: the
    video's id and address, or the error and its HTTP status."""
    position, eta, waiting_for = Place(None, None) if job.status in FINISHED else places.of(job)
    completed = job.status == COMPLETED
    return {
        "task_id": job.id,
        "status": job.status,
        **asdict(job.progress or Progress()),
        "preview": previews.link(job.id, route) if job.status == IN_PROGRESS else None,
        "queue_position": position,
        "eta_seconds": None if eta is None else round(eta, 1),
        "waiting_for": waiting_for,
        "output_id": job.id if completed else None,
        "output_path": f"{route}/get?task_id={job.id}" if completed else None,
        "error": job.error,
        "error_status": job.error_status,
    }


CONTENT_TYPE = "text/event-stream"
# A comment at least this often keeps proxies from closing a quiet stream.
HEARTBEAT_SECONDS = 15.0
# How often a stream reads its job's new changes.
POLL_SECONDS = 0.25
# Threads the streams of one process share for their store reads.
READERS = 4
HEARTBEAT = b": keep-alive\n\n"


@dataclass(frozen=True)
class Seen:
    """What a client has seen of a job, as its last event's id says."""

    change: str | None = None
    position: int | None = None
    preview: str | None = None

    @classmethod
    def parse(cls, event_id: str | None) -> Seen:
        change, _, rest = (event_id or "").partition(".")
        position, _, preview = rest.partition(".")
        return cls(change or None, int(position) if position.isdigit() else None, preview or None)

    def event_id(self) -> str:
        return f"{self.change}.{'' if self.position is None else self.position}.{self.preview or ''}"


def seen_in(change: str, data: dict[str, Any]) -> Seen:
    preview = data["preview"]
    return Seen(change, data["queue_position"], preview and preview.rpartition("v=")[2])


def event(seen: Seen, data: dict[str, Any]) -> bytes:
    return f"id: {seen.event_id()}\nevent: {data['status']}\ndata: {json.dumps(data)}\n\n".encode()


class JobEvents:
    """The events of one job for one client: `changes(after)` reads the store's changes of the job
    after the one named (all without), `describe(job)` builds what /progress says of a state."""

    def __init__(
        self,
        job: Job,
        changes: Callable[[str | None], list[tuple[str, Job]]],
        describe: Callable[[Job], dict[str, Any]],
        last_event_id: str | None,
    ):
        self.job = job
        self.changes = changes
        self.describe = describe
        self.seen = Seen.parse(last_event_id)

    def look(self) -> list[tuple[Seen, dict[str, Any]]]:
        """The events the client has not seen, each with what it will have seen then. Blocking: in a thread."""
        found = self.changes(self.seen.change)
        if self.seen.change is None:
            # A new follower starts from now; a job whose changes the store no longer keeps, from its record.
            found = found[-1:] or [("0", self.job)]
        if not found:
            # No recorded change, but its position or preview may have moved on.
            found = [(self.seen.change, self.job)]
        events = []
        for change, job in found:
            data = self.describe(job)
            seen = seen_in(change, data)
            if seen != self.seen:
                events.append((seen, data))
                self.seen, self.job = seen, job
        return events

    async def stream(self, limiter: anyio.CapacityLimiter) -> AsyncIterator[bytes]:
        quiet_since = time.monotonic()
        while True:
            for seen, data in await anyio.to_thread.run_sync(self.look, limiter=limiter):
                yield event(seen, data)
                quiet_since = time.monotonic()
                if data["status"] in FINISHED:
                    return
            if self.job.status in FINISHED:
                return  # a client that reconnected after the end: nothing more will come
            if time.monotonic() - quiet_since >= HEARTBEAT_SECONDS:
                yield HEARTBEAT
                quiet_since = time.monotonic()
            await anyio.sleep(POLL_SECONDS)
