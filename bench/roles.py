"""Roles: what an api replica (SVD_ROLE=api) costs beside the whole service, and what a request
pays for going through the queue to a GPU worker.

`all` and `api` each start on the same Redis and outputs folder: seconds from launching
`bentoml serve` to /readyz 200, and the resident memory of all its processes once ready. Then
the same synchronous /generate, `runs` times: on `all`, which runs it itself, then through an
api replica to a worker replica (the tiny model in both). One after the other, not alternating:
`all` would take the api's jobs from the shared queue.
"""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from bench.memory import total_kib
from bench.report import Row, Section, median
from bench.server import REQUEST_TIMEOUT, is_video, post, workers
from harness import Server, redis_server, serve

MIB = 1024


def run(request: dict[str, int], runs: int, torch_threads: int) -> Section:
    with tempfile.TemporaryDirectory(prefix="bench-roles-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        queue = stack.enter_context(redis_server(root / "redis"))
        env = {"SVD_QUEUE_URL": queue.url, "SVD_OUTPUT_DIR": str(root / "outputs")}
        if torch_threads:
            env["OMP_NUM_THREADS"] = str(torch_threads)
        started: dict[str, tuple[float, float]] = {}
        latencies: dict[str, list[float]] = {"all": [], "api": []}
        for role in ("all", "api"):
            start = time.perf_counter()
            with serve(root / role, {**env, "SVD_ROLE": role}) as server:
                started[role] = (time.perf_counter() - start, _rss_mib(server))
                if role == "all":
                    latencies["all"] = [_generate(server, request) for _ in range(runs)]
                    continue
                with serve(root / "worker", {**env, "SVD_ROLE": "worker"}):
                    latencies["api"] = [_generate(server, request) for _ in range(runs)]
    extra = median(latencies["api"]) - median(latencies["all"])
    return Section(
        "roles",
        [
            Row("ready after launch, s: all / api", f"{started['all'][0]:.1f} / {started['api'][0]:.1f}"),
            Row("memory once ready, MiB: all / api", f"{started['all'][1]:.0f} / {started['api'][1]:.0f}"),
            Row(
                f"/generate, median of {runs}, s: on all / through api and a worker",
                f"{median(latencies['all']):.2f} / {median(latencies['api']):.2f}",
            ),
            Row("extra latency through the queue, s", f"{extra:.2f}"),
        ],
        {"request": request, "started": started, "latencies": latencies, "extra_seconds": extra},
    )


def _rss_mib(server: Server) -> float:
    return total_kib([server.process.pid, *workers(server)]) / MIB


def _generate(server: Server, request: dict[str, int]) -> float:
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as http:
        start = time.perf_counter()
        response = post(http, request)
        seconds = time.perf_counter() - start
    if not is_video(response):
        raise RuntimeError(f"/generate answered {response.status_code}: {response.text[:300]}")
    return seconds
