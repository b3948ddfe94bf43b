"""Fair turns: which waiting job a GPU takes when it frees.

The oldest waiting job of the user who has had the least GPU time in the recent past: the
seconds their finished jobs ran, halved every HALF_LIFE_SECONDS, plus the seconds their
running jobs have run so far. Ties go to the user whose job has waited longest, so with one
user, or on an open service, the queue is first in, first out. GPU time rather than
round-robin, because jobs differ a hundredfold in size: a user of 4-step 256x256 clips and one
of 25-step 1024x576 videos each get their share of the GPU, not of the job count. A user's
long queue cannot starve another's first job: a user with nothing run recently has the least.

Both stores take jobs by this rule in their claim (one SQLite transaction, one Redis script,
the same for every replica); turn_order is the same rule looking ahead, for queue positions.
"""

from __future__ import annotations

from collections.abc import Iterable

from svd.jobs.eta import seconds_for
from svd.jobs.model import IN_PROGRESS, PENDING, Speeds, Unfinished

# How fast past GPU time is forgotten: after this long, a job's seconds count half.
HALF_LIFE_SECONDS = 1800.0


def decayed(seconds: float, at: float, now: float) -> float:
    """GPU seconds recorded at `at`, as they count at `now`."""
    return seconds * 0.5 ** (max(0.0, now - at) / HALF_LIFE_SECONDS)


def used_now(kept: Iterable[tuple[str, float, float]], running: Iterable[Unfinished], now: float) -> dict[str, float]:
    """Each owner's recent GPU seconds: `kept` (owner, seconds, when recorded) decayed to `now`, and
    what their running jobs have run."""
    used = {owner: decayed(seconds, at, now) for owner, seconds, at in kept}
    for job in running:
        used[job.owner] = used.get(job.owner, 0.0) + max(0.0, now - (job.started or now))
    return used


def _next(waiting: list[Unfinished], used: dict[str, float]) -> Unfinished:
    # min keeps the first of equals: the oldest waiting job's owner.
    return min(waiting, key=lambda candidate: used.get(candidate.owner, 0.0))


def next_turn(queue: list[Unfinished], kept: Iterable[tuple[str, float, float]], now: float) -> Unfinished | None:
    """The waiting job of `queue` (running jobs, and waiting ones oldest first) that a GPU freed now
    takes; `kept` is each owner's GPU seconds as recorded (owner, seconds, when)."""
    waiting = [job for job in queue if job.status == PENDING]
    running = [job for job in queue if job.status == IN_PROGRESS]
    return _next(waiting, used_now(kept, running, now)) if waiting else None


def turn_order(
    queue: list[Unfinished], kept: Iterable[tuple[str, float, float]], speeds: Speeds, now: float
) -> list[Unfinished]:
    """`queue` (running jobs, then waiting ones oldest first) with the waiting ones in the order
    the GPUs will take them: each turn as next_turn gives it, its owner then counted the job's
    estimated seconds (one second where the service has no measurement yet)."""
    running = [job for job in queue if job.status == IN_PROGRESS]
    waiting = [job for job in queue if job.status == PENDING]
    used = used_now(kept, running, now)
    ordered: list[Unfinished] = []
    while waiting:
        job = _next(waiting, used)
        waiting.remove(job)
        ordered.append(job)
        used[job.owner] = used.get(job.owner, 0.0) + (seconds_for(job.controls, speeds) or 1.0)
    return running + ordered
