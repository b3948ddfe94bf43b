"""What the HTTP sections share: one `bentoml serve` of the tiny model, the small request, its processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from harness import PHOTO, SMALL, Server, serve

# harness.SMALL with the seed and chunk size pinned, so every run does the same work.
REQUEST: dict[str, int] = {**SMALL, "seed": 42, "decode_chunk_size": 2}
# The smallest the service accepts, for --quick: the bench's own check, not a measurement.
QUICK_REQUEST: dict[str, int] = {**REQUEST, "width": 64, "height": 64, "num_frames": 2, "num_inference_steps": 1}
REQUEST_TIMEOUT = 600.0


@contextmanager
def started(tmp: Path, torch_threads: int) -> Iterator[tuple[Server, float]]:
    """A fresh server (torch_threads 0: torch's default) and the seconds from launching it to /readyz 200."""
    # Every open event stream counts as a request in flight for BentoML: room for the streams section's.
    env = {"SVD_MAX_CONCURRENCY": "64", **({"OMP_NUM_THREADS": str(torch_threads)} if torch_threads else {})}
    start = time.perf_counter()
    with serve(tmp, env) as server:
        yield server, time.perf_counter() - start


def post(http: httpx.Client, request: dict[str, int]) -> httpx.Response:
    """A request as a browser or curl would send it: multipart, the photo as a file."""
    files = {"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}
    return http.post("/generate", files=files, data=request)


def is_video(response: httpx.Response) -> bool:
    """A real answer: 200 with a video. A refusal that lost its status comes back 200 with JSON."""
    return response.status_code == 200 and response.headers.get("content-type", "").startswith("video/")


def server_seconds(response: httpx.Response) -> float:
    """The seconds the service spent on the request, summed over its Server-Timing stages."""
    header = response.headers.get("server-timing", "")
    return sum(float(part.split("dur=")[1]) for part in header.split(",") if "dur=" in part) / 1000


def workers(server: Server) -> list[int]:
    """Every process below `bentoml serve` (its workers), found through /proc."""
    found: list[int] = []
    pending = [server.process.pid]
    while pending:
        pid = pending.pop()
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except FileNotFoundError:  # the thread ended while we looked
                continue
            found += children
            pending += children
    if not found:
        raise RuntimeError(f"bentoml serve (pid {server.process.pid}) has no worker processes")
    return sorted(set(found))
