"""Replicas: jobs per minute with two `bentoml serve` replicas on one Redis queue against one.

The same jobs both ways, all submitted to the first replica at once; each replica runs
one worker with the same torch threads. The first replica runs them alone, then the
second joins (started and ready before the clock starts) and they run them together.
Jobs per minute: jobs over the time from the first submit to the last job's completion.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx

from bench.report import Row, Section
from bench.server import REQUEST_TIMEOUT
from harness import PHOTO, Server, redis_server, serve, wait_until

MIN_SPEED_UP = 1.7


def run(request: dict[str, int], jobs: int, torch_threads: int) -> Section:
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        redis = stack.enter_context(redis_server(root / "redis"))
        # Every job may wait: the bound is not what is measured.
        env = {"SVD_QUEUE_URL": redis.url, "SVD_OUTPUT_DIR": str(root / "outputs"), "SVD_MAX_QUEUE": str(jobs)}
        if torch_threads:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        first = stack.enter_context(serve(root / "a", env))
        alone = _jobs_per_minute(first, request, jobs)
        stack.enter_context(serve(root / "b", env))
        together = _jobs_per_minute(first, request, jobs)
    speed_up = together["jobs_per_minute"] / alone["jobs_per_minute"]
    return Section(
        "replicas",
        [
            Row(
                f"jobs per minute, {jobs} jobs: one replica / two replicas on one Redis queue",
                f"{alone['jobs_per_minute']:.1f} / {together['jobs_per_minute']:.1f}",
            ),
            Row("two replicas against one", f"{speed_up:.2f}×", f">= {MIN_SPEED_UP}×", speed_up >= MIN_SPEED_UP),
        ],
        {"jobs": jobs, "request": request, "one_replica": alone, "two_replicas": together, "speed_up": speed_up},
    )


def _jobs_per_minute(server: Server, request: dict[str, int], jobs: int) -> dict[str, object]:
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as http:
        start = time.time()
        ids = []
        for _ in range(jobs):
            files = {"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}
            response = http.post("/generate_task/submit", files=files, data=request)
            response.raise_for_status()
            ids.append(response.json()["task_id"])

        def statuses() -> list[dict] | None:
            found = [http.get("/generate_task/status", params={"task_id": job}).json() for job in ids]
            return found if all(status["status"] not in ("pending", "in_progress") for status in found) else None

        ended = wait_until(statuses, REQUEST_TIMEOUT * jobs, 0.2, "every job finished")
    seconds = max(datetime.fromisoformat(status["completed_at"]).timestamp() for status in ended) - start
    return {
        "seconds": seconds,
        "jobs_per_minute": 60 * jobs / seconds,
        "statuses": [status["status"] for status in ended],
    }
