"""Memory: resident set size of the server's worker processes over a run of small requests.

Run right after the cold start, so request 1 is the first the server ever answers
and the series shows both the first-request cost and any growth after it.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from bench.report import Row, Section, median
from bench.server import REQUEST_TIMEOUT, post, workers
from harness import Server

MIB = 1024
# Our own bar (the issue sets none): after the first request memory should stay
# flat; allocator noise of a few MiB is not a leak, steady growth is.
MAX_GROWTH_FRACTION = 0.02


def status_kib(pid: int, field: str) -> int:
    """A memory figure (VmRSS, VmHWM) of one process from /proc/PID/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(f"{field} missing from /proc/{pid}/status")


def total_kib(pids: list[int], field: str = "VmRSS") -> int:
    return sum(status_kib(pid, field) for pid in pids)


def run(server: Server, request: dict[str, int], requests: int) -> Section:
    pids = workers(server)
    ready = total_kib(pids)
    rss: list[int] = []
    latencies: list[float] = []
    with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as http:
        for _ in range(requests):
            start = time.perf_counter()
            response = post(http, request)
            latencies.append(time.perf_counter() - start)
            if response.status_code != 200:
                raise RuntimeError(f"request {len(latencies)} answered {response.status_code}: {response.text[:500]}")
            rss.append(total_kib(pids))
    peak = total_kib(pids, "VmHWM")
    arbiter = status_kib(server.process.pid, "VmRSS")
    growth = rss[-1] - rss[0]
    limit = MAX_GROWTH_FRACTION * rss[0]
    later = median(latencies[1:]) if len(latencies) > 1 else latencies[0]
    return Section(
        "memory",
        rows=[
            Row(
                f"worker RSS ready / after request 1 / after {requests}",
                f"{ready / MIB:.0f} / {rss[0] / MIB:.0f} / {rss[-1] / MIB:.0f} MiB",
            ),
            Row(
                f"worker RSS growth, request 1 to {requests}",
                f"{growth / MIB:+.1f} MiB",
                f"≤ {limit / MIB:.0f} MiB (2 %, our bar)",
                growth <= limit,
            ),
            Row("worker peak RSS (VmHWM)", f"{peak / MIB:.0f} MiB"),
            Row("arbiter RSS (`bentoml serve` itself)", f"{arbiter / MIB:.0f} MiB"),
            Row("first request after ready / median of the rest", f"{latencies[0]:.2f} s / {later:.2f} s"),
        ],
        data={
            "worker_pids": pids,
            "rss_mib_ready": round(ready / MIB, 1),
            "rss_mib_after_each": [round(value / MIB, 1) for value in rss],
            "peak_rss_mib": round(peak / MIB, 1),
            "arbiter_rss_mib": round(arbiter / MIB, 1),
            "latency_seconds": [round(value, 3) for value in latencies],
        },
    )
