"""When a job's video will be ready: its place in the queue, and an estimate from this service's own speed.

The runners record how long each job took and how long it held its worker's GPU turn
(JobStore.learn), by its size: the controls that decide its work (frames, pixels, steps,
DeepCache interval, decode chunk, segments, interpolation, format). A job of a size the service
has run is estimated at that size's measured time; another at the measured seconds per unit of
work. A job is ready its whole time after it starts, but its worker starts the next job as
soon as it gives back the turn (its video is written meanwhile): the jobs ahead of it count
their turns only. They take the workers taking jobs (JobStore.live_workers) in turn: an idle
one at once, a busy one once its running job's turn is over. With no worker taking jobs (scaled
to zero), a waiting job's ETA is unknown: it waits for a worker to start.
"""

from __future__ import annotations

import heapq
import json
from typing import Any, NamedTuple

from svd.base.params import GenerationParams
from svd.jobs.model import IN_PROGRESS, PENDING, Speeds, Unfinished

# The controls that decide how long a job runs; the rest (seed, motion, guidance) do not.
SIZE_FIELDS = (
    "width", "height", "num_frames", "num_inference_steps", "cache_interval",
    "decode_chunk_size", "segments", "interpolate", "format",
)
# How far one new run moves a size's learned time: recent runs count more, as the load changes.
NEW_RUN_WEIGHT = 0.5
# Before a size, the key of the seconds its jobs held the GPU turn (the job's whole time has none).
TURN = "turn:"
# SVD-XT's own frames, when the job leaves num_frames to the model.
MODEL_FRAMES = 25
DEFAULTS = GenerationParams()


def size_of(controls: dict[str, Any]) -> str:
    """The size a job's measured time is kept under."""
    return json.dumps({name: controls.get(name) for name in SIZE_FIELDS}, sort_keys=True)


def work_of(controls: dict[str, Any]) -> float:
    """A job's work in frame-pixel-passes: its full UNet passes and one for the decode, per segment."""

    def value(name: str) -> Any:
        given = controls.get(name)
        return getattr(DEFAULTS, name) if given is None else given

    frames = value("num_frames") or MODEL_FRAMES
    passes = value("num_inference_steps") / value("cache_interval") + 1
    return float(frames * value("width") * value("height") * passes * value("segments"))


def learned(old: float | None, seconds: float) -> float:
    """A size's time after one more run of `seconds`."""
    return seconds if old is None else old + NEW_RUN_WEIGHT * (seconds - old)


def runs_of(size: str, work: float, seconds: float, turn_seconds: float | None) -> list[tuple[str, float]]:
    """What one run teaches, as the stores keep it: each key with the run's seconds for it."""
    runs = [(size, seconds), ("", seconds / work)]
    if turn_seconds is not None:
        runs += [(TURN + size, turn_seconds), (TURN, turn_seconds / work)]
    return runs


def speeds_of(known: dict[str, float]) -> Speeds:
    """The speeds from what the stores keep (runs_of's keys and their learned seconds)."""
    whole = {key: seconds for key, seconds in known.items() if not key.startswith(TURN)}
    turn = {key.removeprefix(TURN): seconds for key, seconds in known.items() if key.startswith(TURN)}
    return Speeds(whole, whole.pop("", None), turn, turn.pop("", None))


def seconds_for(controls: dict[str, Any], speeds: Speeds) -> float | None:
    """How long a job of these controls runs, by this service's measurements; None before any."""
    return _measured(controls, speeds.by_size, speeds.per_work)


def turn_seconds_for(controls: dict[str, Any], speeds: Speeds) -> float | None:
    """How long a job of these controls holds its worker's GPU turn: its worker's next job starts then.
    Its whole time where no turn was measured."""
    held = _measured(controls, speeds.turn_by_size, speeds.turn_per_work)
    return seconds_for(controls, speeds) if held is None else held


def _measured(controls: dict[str, Any], by_size: dict[str, float], per_work: float | None) -> float | None:
    known = by_size.get(size_of(controls))
    if known is not None:
        return known
    return None if per_work is None else per_work * work_of(controls)


class Place(NamedTuple):
    """Where a job is: its queue position (jobs waiting ahead of it; None once it runs or has ended),
    the seconds until its video is ready (None once it has ended, while the service has no
    measurement, or while no worker takes jobs), and what it waits for: "worker" while no worker
    takes jobs (scaled to zero: one must start first), else None."""

    position: int | None
    eta: float | None
    waiting_for: str | None = None


def place(job_id: str, queue: list[Unfinished], speeds: Speeds, now: float, workers: int) -> Place:
    """The job's place in `queue`, with `workers` taking jobs (JobStore.live_workers)."""
    waiting = [job for job in queue if job.status == PENDING]
    position = next((index for index, job in enumerate(waiting) if job.id == job_id), None)
    # Each running job holds its worker until it gives back the GPU turn: the worker's next job
    # starts then, while the video of the last one is written.
    busy: list[float] = []
    for job in queue:
        if job.status != IN_PROGRESS:
            continue
        seconds, held = seconds_for(job.controls, speeds), turn_seconds_for(job.controls, speeds)
        if seconds is None or held is None:
            return Place(position, None)
        elapsed = now - (job.started or now)
        if job.id == job_id:
            return Place(None, max(0.0, seconds - elapsed))
        busy.append(max(0.0, held - elapsed))
    if position is None:
        return Place(None, None)
    if workers < 1:
        return Place(position, None, "worker")
    # Each worker is free when its running job gives back the turn, an idle one now. A worker may
    # hold two jobs, the next one denoising while the last one's video is written: it is free
    # when the later one gives back the turn.
    busy.sort()
    free = busy[max(0, len(busy) - workers) :] + [0.0] * max(0, workers - len(busy))
    heapq.heapify(free)
    for job in waiting[: position + 1]:
        seconds, held = seconds_for(job.controls, speeds), turn_seconds_for(job.controls, speeds)
        if seconds is None or held is None:
            return Place(position, None)
        start = heapq.heappop(free)
        heapq.heappush(free, start + held)
    return Place(position, start + seconds)
