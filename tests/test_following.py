"""Following a job: its event stream, idempotent submits, its queue position and ETA.

The store's parts are tested on both stores (SQLite, Redis), as tests/test_jobs.py does; the
stream on the task routes in this process, with two stores on one real Redis as two replicas;
the whole on a real `bentoml serve`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import PHOTO, Server, redis_server, wait_until
from svd.base.progress import Progress
from svd.base.retention import Retention
from svd.http.request_fields import JobInput
from svd.http.task_routes import JobRoutes
from svd.jobs import eta, following
from svd.jobs.model import COMPLETED, IDEMPOTENCY_SECONDS, PENDING, Idempotency, KeyReused, Unfinished
from svd.jobs.redis import IDEMPOTENCY, RedisJobs
from svd.jobs.sqlite import SQLiteJobs
from svd.jobs.store import JobStore
from svd.storage.outputs import Outputs
from svd.tools.client import events_of, follow
from tests.test_jobs import stores  # noqa: F401  (the fixture: both stores)

ROUTE = "/generate_task"
# Tiny jobs that run in about a second each on two shared cores.
TINY = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 3}


def test_the_store_records_every_change_in_order_and_resumes_after_any(stores):  # noqa: F811
    submitter, worker = stores(), stores()  # two replicas, one store
    job_id = submitter.submit(b"x", "a.png", {}, per_worker=10).id
    claim = worker.claim("w")
    for step in (1, 2, 3):
        assert worker.report(claim, Progress("denoise", step, 3))
    assert worker.finish(claim, COMPLETED)

    changes = submitter.events(job_id)
    assert [(job.status, job.progress.step) for _, job in changes] == [
        ("pending", 0), ("in_progress", 0), ("in_progress", 1), ("in_progress", 2), ("in_progress", 3),
        ("completed", 3),
    ]
    ids = [change for change, _ in changes]
    assert len(set(ids)) == len(ids)
    for index, change in enumerate(ids):
        assert submitter.events(job_id, change) == changes[index + 1 :], f"after {change}"
    assert worker.events("0" * 32) == []


def test_an_idempotency_key_answers_its_job_once_per_request_and_token(stores):  # noqa: F811
    store = stores()
    first = store.submit(b"x", "a.png", {"seed": 1}, per_worker=10, idempotency=Idempotency("token-a:k", "r1"))
    again = store.submit(b"x", "a.png", {"seed": 1}, per_worker=10, idempotency=Idempotency("token-a:k", "r1"))
    assert again.id == first.id and store.depth().waiting == 1, "nothing new queued"
    with pytest.raises(KeyReused) as reused:
        store.submit(b"y", "a.png", {"seed": 2}, per_worker=10, idempotency=Idempotency("token-a:k", "r2"))
    assert reused.value.job_id == first.id
    other = store.submit(b"x", "a.png", {"seed": 1}, per_worker=10, idempotency=Idempotency("token-b:k", "r1"))
    assert other.id != first.id, "another token's key is another key"

    # A day later the key is free again.
    if isinstance(store, SQLiteJobs):
        store._update("UPDATE idempotency_keys SET created = created - :day", day=IDEMPOTENCY_SECONDS + 1)
    else:
        assert 0 < store._redis.ttl(IDEMPOTENCY + "token-a:k") <= IDEMPOTENCY_SECONDS
        store._redis.pexpire(IDEMPOTENCY + "token-a:k", 1)
        wait_until(lambda: not store._redis.exists(IDEMPOTENCY + "token-a:k"), 10, 0.01, "the key expired")
    later = store.submit(b"y", "a.png", {"seed": 2}, per_worker=10, idempotency=Idempotency("token-a:k", "r2"))
    assert later.id not in (first.id, other.id)


def test_a_job_is_never_placed_from_a_queue_read_before_it_started_or_was_submitted(stores):  # noqa: F811
    """The queue behind places is read once per 0.5 s, but never trusted about the job asked for
    when it disagrees with the job's own record: the browser test saw "1st in line" while denoising."""
    store = stores()
    places = following.QueuePlaces(lambda: store)
    first = store.submit(b"image", "photo.png", {}, per_worker=10)
    assert places.of(first).position == 0
    second = store.submit(b"image", "photo.png", {}, per_worker=10)
    assert places.of(second).position == 1, "submitted after the last read"
    store.claim("w")
    assert places.of(store.get(first.id)).position is None, "started after the last read"
    assert places.of(store.get(second.id)).position == 0


def test_positions_count_down_and_the_eta_is_the_learned_time_of_the_jobs_ahead(stores):  # noqa: F811
    store = stores()
    small, large = {"width": 64, "height": 64}, {"width": 128, "height": 128}
    store.learn(eta.size_of(small), eta.work_of(small), 10.0)
    store.learn(eta.size_of(small), eta.work_of(small), 20.0)  # the newest run weighs half
    store.learn(eta.size_of(large), eta.work_of(large), 40.0)
    speeds = store.speeds()
    assert speeds.by_size[eta.size_of(small)] == 15.0
    ids = [store.submit(b"x", "a.png", controls, per_worker=10).id for controls in (small, large, small)]

    def places(now: float) -> list[tuple[int | None, float | None]]:
        return [eta.place(job_id, store.unfinished(), store.speeds(), now, workers=1)[:2] for job_id in ids]

    assert places(time.time()) == [(0, 15.0), (1, 55.0), (2, 70.0)]
    claimed = store.claim("w")
    started = store.get(claimed.id).started
    assert places(started + 5) == [(None, 10.0), (0, 50.0), (1, 65.0)]
    store.finish(claimed, COMPLETED)
    assert places(time.time())[1:] == [(0, 40.0), (1, 55.0)]
    assert eta.place(ids[0], store.unfinished(), store.speeds(), time.time(), 1) == (None, None, None), "ended"


def test_the_jobs_ahead_count_the_time_they_hold_the_gpu_and_the_job_itself_its_whole_time(stores):  # noqa: F811
    """A worker starts its next job when the last one gives back the GPU turn, while its video is written."""
    store = stores()
    job = {"width": 64, "height": 64}
    size, work = eta.size_of(job), eta.work_of(job)
    store.learn(size, work, 10.0, turn_seconds=8.0)
    speeds = store.speeds()
    assert (speeds.by_size, speeds.turn_by_size) == ({size: 10.0}, {size: 8.0})
    assert (speeds.per_work, speeds.turn_per_work) == (pytest.approx(10.0 / work), pytest.approx(8.0 / work))
    ids = [store.submit(b"x", "a.png", job, per_worker=10).id for _ in range(3)]

    def places(now: float) -> list[eta.Place]:
        return [eta.place(job_id, store.unfinished(), store.speeds(), now, workers=1) for job_id in ids]

    assert places(time.time()) == [(0, 10.0, None), (1, 18.0, None), (2, 26.0, None)]
    started = store.get(store.claim("w").id).started
    assert places(started + 5) == [(None, 5.0, None), (0, 13.0, None), (1, 21.0, None)]
    assert places(started + 9) == [(None, 1.0, None), (0, 10.0, None), (1, 18.0, None)], "its video is written"


def _worker_asks_for_work(store: JobStore, worker: str) -> None:
    """A worker of the store's kind taking jobs: SQLite's are the server's own; Redis's ask it for work."""
    if isinstance(store, RedisJobs):
        assert store.claim(worker) is None, "nothing waits yet"


def test_idle_workers_take_the_jobs_ahead_at_once_and_with_none_the_eta_waits_for_one(stores):  # noqa: F811
    store = stores(workers=2) if isinstance(stores(), SQLiteJobs) else stores()
    job = {"width": 64, "height": 64}
    store.learn(eta.size_of(job), eta.work_of(job), 10.0)
    if isinstance(store, RedisJobs):
        assert store.live_workers() == 0, "no worker has asked for work: scaled to zero"
        ids = [store.submit(b"x", "a.png", job, per_worker=10).id for _ in range(3)]
        assert eta.place(ids[0], store.unfinished(), store.speeds(), time.time(), 0) == (0, None, "worker")
        assert eta.place(ids[0], store.unfinished(), store.speeds(), time.time(), 1) == (0, 10.0, None)
        for job_id in ids:
            store.cancel(job_id)
    for worker in ("w1", "w2"):
        _worker_asks_for_work(store, worker)
    assert store.live_workers() == 2
    ids = [store.submit(b"x", "a.png", job, per_worker=10).id for _ in range(3)]

    def places(now: float, workers: int) -> list[eta.Place]:
        return [eta.place(job_id, store.unfinished(), store.speeds(), now, workers) for job_id in ids]

    assert places(time.time(), 1) == [(0, 10.0, None), (1, 20.0, None), (2, 30.0, None)]
    assert places(time.time(), 2) == [(0, 10.0, None), (1, 10.0, None), (2, 20.0, None)], "both workers at once"
    claim = store.claim("w1")
    started = store.get(claim.id).started
    assert places(started + 4, 2) == [(None, 6.0, None), (0, 10.0, None), (1, 16.0, None)]
    assert places(started + 4, 1) == [(None, 6.0, None), (0, 16.0, None), (1, 26.0, None)]
    if isinstance(store, RedisJobs):
        wait_until(
            lambda: stores(lease=1).live_workers() == 0, 10, 0.05, "workers that stopped asking for work left"
        )


def test_with_no_worker_the_status_and_the_events_say_the_job_waits_for_one(tmp_path: Path):
    with redis_server(tmp_path / "redis") as server:
        store = RedisJobs(server.url)  # an api replica's; no worker runs
        store.learn(eta.size_of(TINY), eta.work_of(TINY), 10.0)
        routes = routes_on(store, tmp_path)
        job_id = store.submit(b"x", "a.png", TINY, per_worker=10).id

        async def scenario() -> tuple[dict[str, Any], bytes]:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=routes), base_url="http://svd") as client:
                status = await client.get(f"{ROUTE}/status", params={"task_id": job_id})
            follower = Follower(routes, job_id)
            first = await follower.first()
            follower.gone.set()
            await asyncio.wait_for(follower.answering, 10)
            return status.json(), first

        status, first = asyncio.run(scenario())
    event = json.loads(first.decode().split("data: ", 1)[1])
    for answer in (status, event):
        assert (answer["queue_position"], answer["eta_seconds"], answer["waiting_for"]) == (0, None, "worker"), answer


def test_the_readme_and_the_page_say_the_same_of_a_job_waiting_for_a_worker():
    root = Path(__file__).parent.parent
    words = "waiting for a GPU worker to start"
    assert f'"{words}"' in (root / "svd/http/static/app.js").read_text()
    readme = " ".join((root / "README.md").read_text().split())
    assert "`waiting_for` (`\"worker\"`" in readme and f"“{words}”" in readme


def test_a_size_never_run_is_estimated_from_the_seconds_per_unit_of_work():
    small, double = {"width": 64, "height": 64}, {"width": 128, "height": 64}
    speeds = eta.Speeds({eta.size_of(small): 10.0}, 10.0 / eta.work_of(small))
    queue = [Unfinished("a", PENDING, None, double)]
    assert eta.place("a", queue, speeds, time.time(), 1) == (0, pytest.approx(20.0), None)
    assert eta.place("a", queue, eta.Speeds({}, None), time.time(), 1) == (0, None, None), "nothing measured yet"


class Follower:
    """One client of ROUTE/events, answered by `routes` in this process: its events as they come."""

    def __init__(self, routes: JobRoutes, job_id: str, last_event_id: str | None = None):
        self.chunks: asyncio.Queue[bytes] = asyncio.Queue()
        self.gone = asyncio.Event()
        self.status: int | None = None
        headers = [(b"last-event-id", last_event_id.encode())] if last_event_id else []
        scope = {
            "type": "http", "method": "GET", "path": f"{ROUTE}/events", "headers": headers,
            "query_string": f"task_id={job_id}".encode(),
        }
        self.answering = asyncio.ensure_future(routes(scope, self._receive, self._send))
        self._lines: list[str] = []

    async def _receive(self) -> dict[str, Any]:
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message.get("more_body"):
            await self.chunks.put(message["body"])
        else:
            await self.chunks.put(b"")  # the end

    async def events(self, deadline: float = 60) -> list[tuple[str, dict[str, Any]]]:
        """Every event until the stream ends."""
        text = b""
        while chunk := await asyncio.wait_for(self.chunks.get(), deadline):
            text += chunk
        return [(event_id, json.loads(data)) for event_id, data in events_of(text.decode().split("\n"))]

    async def first(self, deadline: float = 60) -> bytes:
        return await asyncio.wait_for(self.chunks.get(), deadline)


def routes_on(store: JobStore, tmp_path: Path) -> JobRoutes:
    async def nothing(scope, receive, send) -> None:
        raise AssertionError(f"not a task route: {scope['path']}")

    outputs = Outputs(tmp_path / "out", Retention())
    return JobRoutes(nothing, ROUTE, lambda: store, JobInput, per_worker=10, outputs=outputs, max_pixels=10**8)


def test_a_job_running_on_one_replica_streams_from_another_in_order_and_resumes_exactly(tmp_path: Path):
    with redis_server(tmp_path / "redis") as server:
        here, there = RedisJobs(server.url), RedisJobs(server.url)
        routes = routes_on(here, tmp_path)
        job_id = here.submit(b"x", "a.png", TINY, per_worker=10).id

        async def scenario() -> tuple[list, list, list]:
            live = Follower(routes, job_id)
            first = await live.first()
            assert b"event: pending" in first and b'"queue_position": 0' in first

            def run_there() -> None:
                claim = there.claim("replica-b")
                for step in range(1, 6):
                    there.report(claim, Progress("denoise", step, 5))
                there.finish(claim, COMPLETED)

            await asyncio.to_thread(run_there)
            events = [(None, json.loads(first.decode().split("data: ", 1)[1]))] + await live.events()
            await live.answering
            again = await Follower(routes, job_id, last_event_id=events[3][0]).events()
            finished = await Follower(routes, job_id).events()
            after_the_end = await Follower(routes, job_id, last_event_id=events[-1][0]).events()
            return events, again, finished + after_the_end

        events, again, finished = asyncio.run(scenario())
    assert [event["status"] for _, event in events] == ["pending", "in_progress", *["in_progress"] * 5, "completed"]
    assert [event["step"] for _, event in events[2:]] == [1, 2, 3, 4, 5, 5], "every step, in order"
    end = events[-1][1]
    assert end["output_id"] == job_id and end["output_path"] == f"{ROUTE}/get?task_id={job_id}"
    assert end["queue_position"] is None and end["eta_seconds"] is None
    assert again == events[4:], "a reconnect gets what it missed, and nothing twice"
    assert finished == events[-1:], "a finished job's stream is its end, at once, and after its end nothing"


def test_a_client_that_goes_away_ends_its_stream_and_a_quiet_one_gets_heartbeats(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(following, "HEARTBEAT_SECONDS", 0.3)
    store = SQLiteJobs(tmp_path / "jobs.db")
    routes = routes_on(store, tmp_path)
    job_id = store.submit(b"x", "a.png", TINY, per_worker=10).id

    async def scenario() -> None:
        follower = Follower(routes, job_id)
        assert b"event: pending" in await follower.first()
        assert await follower.first() == following.HEARTBEAT
        follower.gone.set()
        await asyncio.wait_for(follower.answering, 10)  # the stream's work has ended

    asyncio.run(scenario())


def _submit(server: Server, controls: dict[str, Any], key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{server.url}{ROUTE}/submit",
        files={"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")},
        data={name: str(value) for name, value in controls.items()},
        headers={"Idempotency-Key": key} if key else {},
        timeout=60,
    )


def test_a_real_job_streams_every_step_to_its_video_and_its_key_answers_it_once(server: Server):
    controls = {**TINY, "num_inference_steps": 30}
    key = uuid.uuid4().hex
    first = _submit(server, controls, key)
    assert first.status_code == 200, first.text
    task_id = first.json()["task_id"]
    again = _submit(server, controls, key)
    assert (again.status_code, again.json()["task_id"]) == (200, task_id)
    other = _submit(server, {**controls, "seed": 3}, key)
    assert other.status_code == 422 and task_id in other.json()["error"], other.text

    seen = list(follow(server.url, task_id, timeout=120))
    denoising = [event["step"] for event in seen if event["stage"] == "denoise" and event["status"] == "in_progress"]
    assert denoising, seen
    # A step may come twice: a new preview within it is a change a user sees too.
    assert denoising == sorted(denoising), "in order"
    assert sorted(set(denoising)) == list(range(denoising[0], 31)), "every step"
    end = seen[-1]
    assert end["status"] == "completed" and seen.count(end) == 1
    video = httpx.get(f"{server.url}{end['output_path']}", timeout=60)
    assert video.status_code == 200
    status = httpx.get(f"{server.url}{ROUTE}/status", params={"task_id": task_id}, timeout=30).json()
    assert status["status"] == "completed" and status["queue_position"] is None


def _eta_errors(server: Server, sizes: list[dict[str, Any]]) -> list[float]:
    """Submit a queue of jobs of `sizes` at once; each one's ETA then against when its video was ready:
    (ETA - actual) / actual, in queue order."""
    ids = [_submit(server, size).json()["task_id"] for size in sizes]
    asked = []
    for task_id in ids:
        progress = httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=30).json()
        asked.append((time.time(), progress["eta_seconds"]))
    assert list(follow(server.url, ids[-1], timeout=300))[-1]["status"] == "completed"
    # Each job's video is promised after the one ahead of it: by its turn at the least.
    promised = [when + eta_seconds for when, eta_seconds in asked]
    assert all(later > sooner for sooner, later in zip(promised, promised[1:])), asked
    errors = []
    for task_id, (when, eta_seconds) in zip(ids, asked, strict=True):
        status = httpx.get(f"{server.url}{ROUTE}/status", params={"task_id": task_id}, timeout=30).json()
        assert status["status"] == "completed" and eta_seconds is not None, status
        actual = datetime.fromisoformat(status["completed_at"]).timestamp() - when
        errors.append((eta_seconds - actual) / actual)
    return errors


def _positions_count_down_behind_a_job_held_on_the_gpu(server: Server, size: dict[str, Any]) -> None:
    """Three jobs queued behind one that holds the GPU until the test cancels it: the last one's stream
    starts 2nd in line (0 = next), counts down, then runs. The holder is the longest job there is, canceled
    as soon as the stream has said where the last one stands, so the jobs' own speed decides nothing."""
    holder = _submit(server, {**TINY, "width": 512, "height": 512, "num_inference_steps": 100, "segments": 4})
    holder_id = holder.json()["task_id"]
    assert any(event["status"] == "in_progress" for event in follow(server.url, holder_id, timeout=120))
    ids = [_submit(server, size).json()["task_id"] for _ in range(3)]
    stream = follow(server.url, ids[-1], timeout=300)
    # Until the stream's queue (read at most every 0.5 s) holds the new jobs, their place is not known.
    positions = [next(position for event in stream if (position := event["queue_position"]) is not None)]
    assert positions == [2], positions
    assert httpx.put(f"{server.url}{ROUTE}/cancel", params={"task_id": holder_id}, timeout=30).status_code == 200
    positions += [event["queue_position"] for event in stream]
    # A stream may miss a place, when two jobs move on between its reads; none comes back.
    waiting = [position for position in positions if position is not None]
    assert waiting == sorted(waiting, reverse=True) and positions[-1] is None, positions
    holder_end = httpx.get(f"{server.url}{ROUTE}/status", params={"task_id": holder_id}, timeout=30).json()
    assert holder_end["status"] == "canceled", holder_end


def test_the_eta_of_a_queue_of_one_size_and_of_mixed_sizes(server: Server):
    """Once the service has run jobs of each size, each job of a queue is promised its video after the one
    ahead of it; how near each ETA came to when its video was ready is printed (the README's figure).

    Each size runs twice first: a size's first run in a process is slower (its kernels are set up).
    """
    small, large = TINY, {**TINY, "width": 128, "num_inference_steps": 5}
    for size in (small, large, small, large):
        task_id = _submit(server, size).json()["task_id"]
        assert list(follow(server.url, task_id, timeout=120))[-1]["status"] == "completed"
    _positions_count_down_behind_a_job_held_on_the_gpu(server, small)
    signed, signed_mixed = _eta_errors(server, [small] * 3), _eta_errors(server, [large, small])
    one_size, mixed = [abs(error) for error in signed], [abs(error) for error in signed_mixed]
    print(
        f"ETA error: one size {100 * sum(one_size) / len(one_size):.0f} % mean, {100 * max(one_size):.0f} % max; "
        f"mixed sizes {100 * sum(mixed) / len(mixed):.0f} % mean, {100 * max(mixed):.0f} % max; signed, in queue "
        f"order: {[round(100 * error) for error in signed]}, {[round(100 * error) for error in signed_mixed]} %"
    )
    # The figure is the README's, against the target of 25 %; it is not asserted: on the two cores this
    # suite shares, a job's own time varies from run to run by more than that (README, Place in line).


def test_the_submit_route_answers_a_key_once_and_refuses_a_malformed_one(tmp_path: Path):
    """A key is its user's (another user's same key is theirs: tests/test_users.py)."""
    store = SQLiteJobs(tmp_path / "jobs.db")
    routes = routes_on(store, tmp_path)

    async def submit(key: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=routes)
        async with httpx.AsyncClient(transport=transport, base_url="http://svd") as client:
            return await client.post(
                f"{ROUTE}/submit",
                files={"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")},
                data={name: str(value) for name, value in TINY.items()},
                headers={"Idempotency-Key": key},
            )

    async def scenario() -> list[httpx.Response]:
        return [await submit(key) for key in ("k", "k", "a key with spaces")]

    first, again, malformed = asyncio.run(scenario())
    assert first.json()["task_id"] == again.json()["task_id"]
    assert store.depth().waiting == 1
    assert malformed.status_code == 400 and "Idempotency-Key" in malformed.json()["error"]
