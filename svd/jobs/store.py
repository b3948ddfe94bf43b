"""The interface every job store implements.

Two stores implement it: an SQLite file shared by the workers of one machine
(svd/jobs/sqlite.py, the default) and Redis, shared by every replica of the service
(svd/jobs/redis.py, with SVD_QUEUE_URL); svd/jobs/open.py opens the one the settings name.
"""

from __future__ import annotations

from typing import Any, Protocol

from svd.base.progress import Progress
from svd.jobs.model import Claim, Delivery, Idempotency, Job, QueueDepth, Speeds, Unfinished, Webhook


class JobStore(Protocol):
    """Submit, claim, renew, report, finish, cancel and look up jobs.

    A job's events are kept for its webhook in the same step that causes them (its start in the
    claim; its end in finish, cancel, or a claim that gives up on it): an outbox, so a crash
    between the two loses none.

    Every method is one atomic step in the store, so any worker of any process may call
    any of them at any time. Methods that act for a claim return False once the claim is
    no longer the worker's: the job was cancelled, or its lease lapsed and another
    worker took it. Any method may raise StoreUnavailable.
    """

    def submit(
        self, image: bytes, image_name: str, controls: dict[str, Any], per_worker: int, hook: Webhook | None = None,
        idempotency: Idempotency | None = None, owner: str = "", per_user: int = 0,
    ) -> Job:
        """Queue `owner`'s job, which calls `hook` back; QueueFull when `per_worker` jobs for each worker
        taking jobs are already pending or in progress, UserQueueFull when `per_user` (0: no bound) of
        the owner's are. With `idempotency`, a key already used answers its job, queuing nothing, or
        raises KeyReused when its request was another."""
        ...

    def claim(self, worker: str) -> Claim | None:
        """A job whose lease lapsed, else the oldest pending job of the owner with the least GPU time
        (svd/jobs/fair.py), now leased to `worker`, its start event kept; None when there is none. Jobs
        whose lease lapsed on their last attempt are failed on the way. A job that stops running (finish,
        cancel) counts its time to its owner."""
        ...

    def renew(self, claim: Claim) -> bool:
        """Extend the claim's lease."""
        ...

    def report(self, claim: Claim, progress: Progress) -> bool:
        """Record where the claimed job is, renewing its lease."""
        ...

    def finish(
        self,
        claim: Claim,
        status: str,
        error: str | None = None,
        error_status: int | None = None,
        ended: bytes | None = None,
    ) -> bool:
        """End the claimed job as completed (its video kept by id) or failed (with its error), and keep
        the end event `ended` for its webhook in the same step: an end is never recorded without it."""
        ...

    def cancel(self, job_id: str) -> tuple[Job, bool]:
        """Cancel a pending or running job; returns the job and whether this call cancelled it
        (False: it had already finished). UnknownJob when there is no such job."""
        ...

    def get(self, job_id: str) -> Job | None:
        ...

    def live_workers(self) -> int:
        """How many workers take jobs now: 0 while none runs (scaled to zero, or all stopped)."""
        ...

    def input(self, job_id: str) -> tuple[bytes, str, dict[str, Any]] | None:
        """A job's image, its file name and its controls, kept with its record."""
        ...

    def depth(self) -> QueueDepth:
        ...

    def events(self, job_id: str, after: str | None = None) -> list[tuple[str, Job]]:
        """The job's recorded changes after the one with id `after` (all without), oldest first, each
        with its id: every change of its status or progress, kept as long as the job."""
        ...

    def unfinished(self) -> list[Unfinished]:
        """The jobs running, by when they started, then those waiting, in the order they will be taken
        (svd/jobs/fair.py's turn_order)."""
        ...

    def learn(self, size: str, work: float, seconds: float, turn_seconds: float | None = None) -> None:
        """Record that a job of `size` and `work` (svd/jobs/eta.py) took `seconds` to run, of which it
        held its worker's GPU turn for the first `turn_seconds` (None: not measured)."""
        ...

    def speeds(self) -> Speeds:
        ...

    def notify(self, job_id: str, event: str, body: bytes) -> bool:
        """Keep a delivery of `body` to the job's webhook when it wants `event` (its end, always);
        whether one was kept."""
        ...

    def next_delivery(self, lease: float) -> Delivery | None:
        """The delivery due first, if one is due, held for `lease` seconds for its try."""
        ...

    def retry_delivery(self, delivery_id: str, tries: int, due: float) -> None:
        ...

    def delivered(self, delivery_id: str) -> None:
        """Forget the delivery: sent, or given up."""
        ...

    def reachable(self) -> bool:
        """Whether the store answers now; for the readiness probe."""
        ...
