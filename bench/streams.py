"""Event streams: what clients following a job cost it, and the server's threads.

One job runs with a single client following its events, then one with `streams` clients
following it at once (ROUTE/events). The figures: each job's time on the model (its
Server-Timing), the worker processes' threads before and while the streams are open (a
stream is a coroutine, not a thread), and how many streams the server accepted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from bench.report import Row, Section
from bench.server import REQUEST_TIMEOUT, server_seconds, workers
from harness import PHOTO, Server

# A job with this many streams open may take this much longer on the model than with one.
MAX_RATIO = 1.1


def run(server: Server, request: dict[str, int], streams: int) -> Section:
    alone = asyncio.run(_job(server, request, 1))
    crowded = asyncio.run(_job(server, request, streams))
    ratio = crowded["model_seconds"] / alone["model_seconds"]
    added = crowded["threads_while_open"] - crowded["threads_before"]
    return Section(
        "streams",
        [
            Row(
                f"a job's model time with {streams} clients following its events / with one",
                f"{crowded['model_seconds']:.2f} s / {alone['model_seconds']:.2f} s = {ratio:.2f}",
                f"< {MAX_RATIO}",
                ratio < MAX_RATIO,
            ),
            Row(
                f"worker threads added while {streams} streams are open",
                f"{added} ({crowded['threads_before']} → {crowded['threads_while_open']})",
                f"< {streams}",
                added < streams,
            ),
            Row(f"streams answered 200 and followed to the end, of {streams}", str(crowded["ended"])),
        ],
        {"alone": alone, "crowded": crowded, "streams": streams},
    )


def _threads(server: Server) -> int:
    total = 0
    for pid in workers(server):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                total += int(line.split()[1])
    return total


async def _job(server: Server, request: dict[str, int], streams: int) -> dict:
    limits = httpx.Limits(max_connections=streams + 8)
    async with httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT, limits=limits) as http:
        before = _threads(server)
        files = {"image": (PHOTO.name, PHOTO.read_bytes(), "image/jpeg")}
        task_id = (await http.post("/generate_task/submit", files=files, data=request)).json()["task_id"]
        opened = asyncio.Event()
        connected = []

        async def follow() -> bool:
            async with http.stream("GET", "/generate_task/events", params={"task_id": task_id}) as response:
                connected.append(response.status_code)
                if len(connected) == streams:
                    opened.set()
                if response.status_code != 200:
                    return False
                async for line in response.aiter_lines():
                    if line in ("event: completed", "event: failed", "event: canceled"):
                        return line == "event: completed"
                return False

        following = [asyncio.create_task(follow()) for _ in range(streams)]
        await asyncio.wait_for(opened.wait(), REQUEST_TIMEOUT)
        while_open = _threads(server)
        ended = sum(await asyncio.gather(*following))
        video = await http.get("/generate_task/get", params={"task_id": task_id})
        assert video.status_code == 200, video.text
    return {
        "model_seconds": server_seconds(video),
        "threads_before": before,
        "threads_while_open": while_open,
        "answers": sorted(set(connected)),
        "ended": ended,
    }
