"""Under load: N concurrent clients against one server, for N in 1, 2, 4, 8.

The model runs one generation at a time, so the best any N can do is N=1's
throughput; queueing, admission (429) and retries must not cost more than 5 %.
Each level is bounded: a fixed number of videos, and a deadline after which no
client sends again. Clients honour Retry-After, as a well-behaved client would.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx

from bench.report import Row, Section, median, percentile
from bench.server import REQUEST_TIMEOUT, is_video, post, server_seconds
from harness import Server

MIN_THROUGHPUT_FRACTION = 0.95
ALLOWED = {"200", "429"}
# A 200 that carries no video: a refusal whose status got lost on the way out.
NOT_A_VIDEO = "200 without video"


@dataclass
class Level:
    clients: int
    wall_seconds: float = 0.0
    # Seconds from send to answer, by answer ("200", "429", ...).
    latencies: dict[str, list[float]] = field(default_factory=dict)
    # Server-Timing of the videos: how long the model was busy, which the noise of
    # a shared machine stretches alike with the wall time.
    busy_seconds: float = 0.0
    retry_after: list[float] = field(default_factory=list)

    @property
    def videos(self) -> int:
        return len(self.latencies.get("200", []))

    @property
    def throughput(self) -> float:
        return self.videos / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def busy_share(self) -> float:
        return self.busy_seconds / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def answers(self) -> dict[str, int]:
        return {answer: len(values) for answer, values in sorted(self.latencies.items())}


def _answer(response: httpx.Response) -> str:
    if is_video(response):
        return "200"
    return NOT_A_VIDEO if response.status_code == 200 else str(response.status_code)


def run_level(server: Server, request: dict[str, int], clients: int, videos: int, seconds: float) -> Level:
    """`clients` threads share `videos` videos; a refused client waits as Retry-After says, then asks again."""
    level = Level(clients)
    lock = threading.Lock()
    start_line = threading.Barrier(clients + 1)
    deadline = 0.0  # set just before the start line opens

    def client(quota: int) -> None:
        with httpx.Client(base_url=server.url, timeout=REQUEST_TIMEOUT) as http:
            start_line.wait()
            done = 0
            while done < quota and time.monotonic() < deadline:
                sent = time.perf_counter()
                try:
                    response = post(http, request)
                except httpx.HTTPError as exc:
                    with lock:
                        level.latencies.setdefault(type(exc).__name__, []).append(time.perf_counter() - sent)
                    return
                answer = _answer(response)
                with lock:
                    level.latencies.setdefault(answer, []).append(time.perf_counter() - sent)
                    level.busy_seconds += server_seconds(response) if answer == "200" else 0.0
                if answer == "200":
                    done += 1
                elif "retry-after" in response.headers:
                    wait = float(response.headers["retry-after"])
                    with lock:
                        level.retry_after.append(wait)
                    # The server's own back-off, cut short by the level's deadline.
                    time.sleep(max(0.0, min(wait, deadline - time.monotonic())))
                else:
                    return  # a failure: the table shows its status

    quotas = [videos // clients + (index < videos % clients) for index in range(clients)]
    threads = [threading.Thread(target=client, args=(quota,), name=f"client-{n}") for n, quota in enumerate(quotas)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds
    started = time.perf_counter()
    start_line.wait()
    for thread in threads:
        thread.join()
    level.wall_seconds = time.perf_counter() - started
    return level


def run(server: Server, request: dict[str, int], levels: list[int], videos: int, seconds: float) -> Section:
    results = [run_level(server, request, clients, max(videos, clients), seconds) for clients in levels]
    base = results[0]
    section = Section("load", data={"videos_per_level": videos, "deadline_seconds": seconds, "levels": []})
    for level in results:
        ok = level.latencies.get("200", [])
        fraction = level.throughput / base.throughput if base.throughput else 0.0
        section.data["levels"].append(
            {
                "clients": level.clients,
                "wall_seconds": round(level.wall_seconds, 2),
                "videos": level.videos,
                "throughput_per_s": round(level.throughput, 4),
                "fraction_of_first_level": round(fraction, 3),
                "busy_share": round(level.busy_share, 3),
                "answers": level.answers,
                "p50_seconds": round(percentile(ok, 0.5), 3),
                "p95_seconds": round(percentile(ok, 0.95), 3),
                "retry_after_median": median(level.retry_after) if level.retry_after else None,
                "latency_seconds": {key: [round(v, 3) for v in values] for key, values in level.latencies.items()},
            }
        )
        section.rows.append(
            Row(
                f"N={level.clients}: videos/s; model busy; p50 / p95; answers",
                f"{level.throughput:.3f}/s ({fraction:.0%}); {level.busy_share:.0%}; "
                f"{percentile(ok, 0.5):.1f} / {percentile(ok, 0.95):.1f} s; "
                + ", ".join(f"{count}× {answer}" for answer, count in level.answers.items()),
                f"≥ {MIN_THROUGHPUT_FRACTION:.0%} of N={base.clients}; only 200/429",
                fraction >= MIN_THROUGHPUT_FRACTION and set(level.answers) <= ALLOWED and level.videos > 0,
            )
        )
    return section
