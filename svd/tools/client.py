"""The BentoML Python client, with its task submission made to work, and `follow()`: a job's
progress as it changes, from the service's event stream.

BentoML 1.4.39 and 1.4.40's `SyncHTTPClient.<task>.submit()` closes a list of
opened files that the client never creates, so every submit fails with
AttributeError '_opened_files'. This subclass starts that list empty.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Any

import bentoml
import httpx

EVENTS_ROUTE = "/generate_task/events"
ENDED = ("completed", "failed", "canceled")
# A stream quiet for longer than this has dropped: the server sends a heartbeat every 15 s.
QUIET_SECONDS = 45.0


class SyncHTTPClient(bentoml.SyncHTTPClient):
    """`bentoml.SyncHTTPClient` whose `generate_task.submit(...)` works."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._opened_files: list[Any] = []
        super().__init__(*args, **kwargs)


def follow(
    url: str,
    task_id: str,
    token: str | None = None,
    timeout: float = 3600.0,
    poll_seconds: float = 1.0,
) -> Iterator[dict[str, Any]]:
    """Yield what /progress says of the job each time it changes, until its end (the last one yielded).

    From the event stream, picking up where it left off when the connection drops; by polling
    /progress every `poll_seconds` when the server (or a proxy before it) refuses the stream.
    `timeout` bounds the whole wait, in seconds. A refusal of /progress raises httpx.HTTPStatusError.
    """
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last_id: str | None = None
    with httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(30.0, read=QUIET_SECONDS)) as client:
        while time.monotonic() < deadline:
            try:
                with client.stream(
                    "GET", EVENTS_ROUTE, params={"task_id": task_id}, headers={"Last-Event-ID": last_id or ""}
                ) as response:
                    if response.status_code != 200:
                        yield from _poll(client, task_id, deadline, poll_seconds)
                        return
                    for event_id, data in events_of(response.iter_lines()):
                        last_id = event_id
                        progress = json.loads(data)
                        yield progress
                        if progress["status"] in ENDED:
                            return
            except httpx.TransportError:
                time.sleep(poll_seconds)  # dropped: reconnect with the last id after a moment
    raise TimeoutError(f"task {task_id} did not end within {timeout} s")


def events_of(lines: Iterable[str]) -> Iterator[tuple[str | None, str]]:
    """Server-sent events' ids and data, from the stream's lines; comments (heartbeats) skipped."""
    event_id: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield event_id, "\n".join(data)
            data = []
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "id":
            event_id = value
        elif field == "data":
            data.append(value)


def _poll(client: httpx.Client, task_id: str, deadline: float, poll_seconds: float) -> Iterator[dict[str, Any]]:
    last = None
    while time.monotonic() < deadline:
        response = client.post("/progress", json={"task_id": task_id})
        response.raise_for_status()
        progress = response.json()
        if progress != last:
            yield progress
            last = progress
        if progress["status"] in ENDED:
            return
        time.sleep(poll_seconds)
    raise TimeoutError(f"task {task_id} did not end within the timeout")
