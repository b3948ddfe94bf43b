"""When a job's video will be ready: its place in the queue, and an estimate from this service's own speed.

The runners record how long each job took (JobStore.learn), by its size: the controls that
decide its work (frames, pixels, steps, DeepCache interval, decode chunk, segments,
interpolation, format). A job of a size the service has run is estimated at that size's
measured time; another at the measured seconds per unit of work. The jobs ahead of it take
the workers taking jobs (JobStore.live_workers) in turn: an idle one at once, a busy one once
its running job's remaining time has passed. With no worker taking jobs (scaled to zero), a
waiting job's ETA is unknown: it waits for a worker to start.
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


def seconds_for(controls: dict[str, Any], speeds: Speeds) -> float | None:
    """How long a job of these controls runs, by this service's measurements; None before any."""
    known = speeds.by_size.get(size_of(controls))
    if known is not None:
        return known
    return None if speeds.per_work is None else speeds.per_work * work_of(controls)


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
    # Each running job holds a worker until its remaining time has passed.
    busy: list[float] = []
    for job in queue:
        if job.status != IN_PROGRESS:
            continue
        seconds = seconds_for(job.controls, speeds)
        if seconds is None:
            return Place(position, None)
        remaining = max(0.0, seconds - (now - (job.started or now)))
        if job.id == job_id:
            return Place(None, remaining)
        busy.append(remaining)
    if position is None:
        return Place(None, None)
    if workers < 1:
        return Place(position, None, "worker")
    # Each worker is free when its running job ends, an idle one now. A worker may run two jobs,
    # the next one while the last one's video is written: it is free when the later one ends.
    busy.sort()
    free = busy[max(0, len(busy) - workers) :] + [0.0] * max(0, workers - len(busy))
    heapq.heapify(free)
    for job in waiting[: position + 1]:
        seconds = seconds_for(job.controls, speeds)
        if seconds is None:
            return Place(position, None)
        ready = heapq.heappop(free) + seconds
        heapq.heappush(free, ready)
    return Place(position, ready)
