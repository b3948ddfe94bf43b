"""Jobs that are never lost: the job store, cancel, a worker or a whole server killed, restarts.

The store is tested on its own SQLite file, as two workers would share it; the rest
against real `bentoml serve` processes of the tiny model.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest
import redis

from harness import PHOTO, ROOT, SMALL, Server, decode_video, redis_server, serve, wait_until
from svd.base.progress import Progress
from svd.base.retention import Retention
from svd.base.settings import ConfigError, Settings
from svd.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    PENDING,
    QueueDepth,
    QueueFull,
    StoreUnavailable,
    UnknownJob,
    Webhook,
)
from svd.jobs.redis import RedisJobs
from svd.jobs.runner import keep_video
from svd.jobs.sqlite import SQLiteJobs
from svd.jobs.store import JobStore
from svd.jobs.webhooks.events import ended_body, started_body
from svd.serving.gpu_turns import Turns
from svd.storage.outputs import Outputs

# Long enough in denoising (about 5 s on two cores) to act while it runs.
SLOW = {**SMALL, "num_inference_steps": 100}
# A dead worker's job is taken again this many seconds after its last renewal.
LEASE = "3"
# The leases of the store tests: what must happen within one (a store call or two, milliseconds)
# has a hundred times that; what must wait for one to lapse waits with no upper bound.
SHORT_LEASE = 2


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., JobStore]]:
    """Opens stores on one SQLite file, or on one real Redis: each store is a worker's."""
    if request.param == "sqlite":
        yield lambda lease=30, attempts=2, **options: SQLiteJobs(tmp_path / "jobs.db", lease, attempts, **options)
        return
    with redis_server(tmp_path / "redis") as server:
        yield lambda lease=30, attempts=2, **options: RedisJobs(server.url, lease, attempts, **options)


def _holder(store: JobStore, job_id: str) -> str:
    """The worker the store names as holding the job."""
    if isinstance(store, SQLiteJobs):
        return store._one("SELECT worker FROM jobs WHERE id = :id", id=job_id)[0]
    return store._redis.hget(f"svd:job:{job_id}", "worker").decode()


def test_the_store_hands_out_each_job_once_oldest_first(stores):
    first, second = stores(), stores()  # two workers, one store
    ids = [first.submit(b"image", "photo.png", {"seed": seed}, per_worker=10).id for seed in range(3)]
    assert [first.get(job_id).status for job_id in ids] == [PENDING] * 3
    assert first.depth().waiting == 3 and first.depth().running == 0
    claims = [second.claim("b"), first.claim("a"), second.claim("b")]
    assert [claim.id for claim in claims] == ids and [claim.controls["seed"] for claim in claims] == [0, 1, 2]
    assert first.claim("a") is None
    assert first.get(ids[0]).status == IN_PROGRESS and first.get(ids[0]).attempt == 1
    assert claims[0].image == b"image" and claims[0].image_name == "photo.png"
    assert second.depth() == QueueDepth(0, 3, 0.0, {"": (0, 3)})


def test_the_store_bounds_the_jobs_waiting_or_running(stores):
    store = stores()
    store.submit(b"x", "a.png", {}, per_worker=2)
    claim = store.claim("a")
    store.submit(b"x", "b.png", {}, per_worker=2)
    with pytest.raises(QueueFull) as full:
        store.submit(b"x", "c.png", {}, per_worker=2)
    assert (full.value.unfinished, full.value.limit) == (2, 2)
    store.finish(claim, COMPLETED)
    store.submit(b"x", "c.png", {}, per_worker=2)


def test_a_shared_queue_is_bounded_per_worker_taking_jobs(tmp_path: Path):
    """With Redis, every replica's worker that asks for work adds SVD_MAX_QUEUE to the bound."""
    with redis_server(tmp_path / "redis") as server:
        store = RedisJobs(server.url, lease=30)
        for index in range(2):
            store.submit(b"x", f"{index}.png", {}, per_worker=2)
        with pytest.raises(QueueFull):
            store.submit(b"x", "c.png", {}, per_worker=2)
        assert store.claim("replica-a") is not None and store.claim("replica-b") is not None
        store.submit(b"x", "c.png", {}, per_worker=2)
        store.submit(b"x", "d.png", {}, per_worker=2)
        with pytest.raises(QueueFull) as full:
            store.submit(b"x", "e.png", {}, per_worker=2)
        assert (full.value.unfinished, full.value.limit) == (4, 4)


def test_a_lapsed_lease_is_taken_again_then_fails_after_the_last_attempt(stores, caplog: pytest.LogCaptureFixture):
    store = stores(lease=SHORT_LEASE, attempts=2)
    job_id = store.submit(b"x", "a.png", {}, per_worker=10, hook=Webhook("https://example.com/h")).id
    first = store.claim("dies")
    assert store.claim("lives") is None, "leased"
    # The worker died: nobody renews. Once the lease lapses, the job is taken again.
    second = wait_until(lambda: store.claim("lives"), 30, 0.05, "the lapsed job taken again")
    assert (second.id, second.attempt) == (job_id, 2)
    assert not store.renew(first) and not store.report(first, Progress("denoise", 3, 25)), (
        "the dead worker's claim is void"
    )
    assert not store.finish(first, COMPLETED)
    assert store.renew(second) and _holder(store, job_id) == "lives"
    behind = store.submit(b"x", "b.png", {}, per_worker=10).id
    assert store.claim("third").id == behind, "the jobs behind run meanwhile"
    # The second worker dies too, and so does the third. Once both leases have lapsed (no sooner:
    # only a lower bound on time), one claim fails the job for good and takes the other again.
    both_claimed = time.monotonic()
    wait_until(lambda: time.monotonic() > both_claimed + SHORT_LEASE + 0.1, 30, 0.05, "both leases lapsed")
    taken = store.claim("fourth")
    assert (taken.id, taken.attempt) == (behind, 2)
    job = store.get(job_id)
    assert job.status == FAILED
    assert job.error_status == 500 and job.error.startswith("the worker running this job stopped 2 times")
    assert f"SVD job {job_id} failed on lives, attempt 2, after" in caplog.text, "the log tells the story"
    # Taken again by the last worker to ask, not named after a worker it failed on the way.
    assert _holder(store, behind) == "fourth"
    end = json.loads(store.next_delivery(lease=30).body)
    assert end["type"] == "task.completed" and end["data"]["status"] == FAILED and end["data"]["error"] == job.error


def test_a_renewed_lease_does_not_lapse(stores):
    store = stores(lease=SHORT_LEASE)
    job_id = store.submit(b"x", "a.png", {}, per_worker=10).id
    claim = store.claim("alive")
    deadline = time.monotonic() + 2.5 * SHORT_LEASE
    while time.monotonic() < deadline:
        assert store.report(claim, Progress("denoise", 1, 25))
        assert store.claim("other") is None, "taken from a worker that renews"
        time.sleep(0.1)  # a worker renews five times per lease
    assert store.finish(claim, COMPLETED) and store.get(job_id).status == COMPLETED
    assert store.depth() == QueueDepth(0, 0, 0.0)


def test_redis_restarted_keeps_the_jobs_and_gives_the_running_one_a_lease_to_renew(tmp_path: Path):
    with redis_server(tmp_path / "redis") as server:
        store = RedisJobs(server.url, lease=SHORT_LEASE)
        running = store.submit(b"x", "a.png", {}, per_worker=10).id
        waiting = store.submit(b"x", "b.png", {}, per_worker=10).id
        claim = store.claim("holder")
        server.stop()
        assert not store.reachable()
        with pytest.raises(StoreUnavailable, match=f"Redis at 127.0.0.1:{server.port}/0, is unreachable"):
            store.submit(b"x", "c.png", {}, per_worker=10)
        with pytest.raises(StoreUnavailable):
            store.report(claim, Progress("denoise", 2, 25))
        # Down for longer than a lease: the running job's lease would have lapsed.
        down = time.monotonic()
        wait_until(lambda: time.monotonic() - down > 1.5 * SHORT_LEASE, 30, 0.1, "a lease's time")
        server.start()
        assert store.reachable()
        assert store.claim("other").id == waiting, "the waiting job was kept"
        assert store.claim("third") is None, "the running job's holder gets a lease to renew"
        assert store.report(claim, Progress("denoise", 3, 25)) and store.finish(claim, COMPLETED)
        assert store.get(running).status == COMPLETED


def test_a_replica_promoted_in_place_of_redis_gives_the_running_job_a_lease_to_renew(tmp_path: Path):
    with redis_server(tmp_path / "primary") as primary, redis_server(tmp_path / "replica") as replica:
        follower = redis.Redis(port=replica.port)
        follower.replicaof("127.0.0.1", primary.port)
        store = RedisJobs(primary.url, lease=SHORT_LEASE)
        job_id = store.submit(b"x", "a.png", {}, per_worker=10).id
        claim = store.claim("holder")
        offset = store._redis.info("replication")["master_repl_offset"]
        wait_until(lambda: follower.info("replication").get("slave_repl_offset", -1) >= offset, 30, 0.05, "in sync")
        # The primary is lost; failing over takes longer than a lease, then the replica is promoted.
        primary.stop()
        lost = time.monotonic()
        wait_until(lambda: time.monotonic() - lost > 1.5 * SHORT_LEASE, 30, 0.1, "a lease's time")
        follower.replicaof("NO", "ONE")
        promoted = RedisJobs(replica.url, lease=SHORT_LEASE)
        assert promoted.claim("other") is None, "the holder gets a lease to renew"
        assert promoted.renew(claim) and promoted.finish(claim, COMPLETED)
        assert promoted.get(job_id).status == COMPLETED


def test_the_store_keeps_webhook_deliveries_until_sent_and_holds_one_while_it_is_tried(stores):
    store = stores()
    plain = store.submit(b"x", "a.png", {}, per_worker=10).id
    hooked = store.submit(b"x", "b.png", {}, per_worker=10, hook=Webhook("https://example.com/h", ("completed",))).id
    assert not store.notify(plain, "completed", b"{}"), "no webhook, nothing kept"
    assert not store.notify(hooked, "start", b"start"), "filtered out"
    assert store.notify(hooked, "completed", b"end")
    delivery = store.next_delivery(lease=SHORT_LEASE)
    assert (delivery.job_id, delivery.url, delivery.body, delivery.tries) == (
        hooked,
        "https://example.com/h",
        b"end",
        0,
    )
    assert store.next_delivery(lease=30) is None, "held while it is tried"
    # Its worker died mid-try: once the hold lapses, another takes it.
    again = wait_until(lambda: store.next_delivery(lease=30), 30, 0.05, "the delivery due again")
    assert again.id == delivery.id
    store.retry_delivery(again.id, 1, time.time() - 1)
    retried = store.next_delivery(lease=30)
    assert (retried.id, retried.tries) == (delivery.id, 1)
    store.delivered(retried.id)
    assert store.next_delivery(lease=30) is None
    # A cancel keeps the end event by itself, in the same step.
    waiting = store.submit(b"x", "c.png", {}, per_worker=10, hook=Webhook("https://example.com/h", ("start",))).id
    store.cancel(waiting)
    end = store.next_delivery(lease=30)
    assert end.job_id == waiting and json.loads(end.body)["data"]["status"] == CANCELED


def test_a_jobs_end_event_is_kept_in_the_step_that_ends_it_and_only_by_the_attempt_that_does(stores):
    store = stores(lease=SHORT_LEASE, attempts=1)
    hook = Webhook("https://example.com/h")
    done, canceled, given_up = (store.submit(b"x", f"{n}.png", {}, per_worker=10, hook=hook).id for n in range(3))
    claim = store.claim("a")
    ended = ended_body(done, COMPLETED, None, 1, output_id=done)
    assert store.finish(claim, COMPLETED, ended=ended)
    assert not store.finish(claim, COMPLETED, ended=ended), "a second end keeps nothing"
    store.cancel(canceled)
    store.claim("dies")  # the last attempt of `given_up`: the claim after its lease fails it
    wait_until(lambda: store.claim("b") is None and store.get(given_up).status == FAILED, 30, 0.05, "given up")
    kept = {}
    while delivery := store.next_delivery(lease=30):
        kept[delivery.job_id] = json.loads(delivery.body)
        store.delivered(delivery.id)
    assert kept[done] == json.loads(ended)
    # The stores write the cancel's and the give-up's events themselves, as svd/jobs/webhooks/events.py does.
    error = store.get(given_up).error
    written = {canceled: ended_body(canceled, CANCELED, None, 0), given_up: ended_body(given_up, FAILED, error, 1)}
    for job_id, body in written.items():
        expected = json.loads(body)
        assert {**kept[job_id], "timestamp": None} == {**expected, "timestamp": None}
        assert datetime.fromisoformat(kept[job_id]["timestamp"]).tzinfo is not None
    assert sorted(kept) == sorted([done, canceled, given_up])


def _kept_bytes(store: JobStore) -> int:
    """What the store takes where it keeps its data: the SQLite file, or Redis's memory."""
    if isinstance(store, SQLiteJobs):
        store._one("PRAGMA wal_checkpoint(TRUNCATE)")
        database = Path(store._one("PRAGMA database_list")[2])
        return sum(path.stat().st_size for path in database.parent.glob(f"{database.name}*"))
    return store._redis.info("memory")["used_memory"]


def test_a_claim_keeps_the_start_event_in_the_same_step(stores):
    store = stores()
    job_id = store.submit(b"x", "a.png", {}, per_worker=10, hook=Webhook("https://example.com/h", ("start",))).id
    assert store.next_delivery(lease=30) is None
    store.claim("a")
    kept = json.loads(store.next_delivery(lease=30).body)
    assert {**kept, "timestamp": None} == {**json.loads(started_body(job_id, 1)), "timestamp": None}


def test_retries_cancelled_again_and_again_keep_one_copy_of_their_image(stores):
    store = stores()
    image = os.urandom(500_000)
    job_id = store.submit(image, "a.png", {"seed": 1}, per_worker=10).id
    store.cancel(job_id)
    before = _kept_bytes(store)
    for _ in range(20):  # /retry then /cancel, as a client in a loop would
        job_id = store.submit(*store.input(job_id), per_worker=10).id
        store.cancel(job_id)
    assert store.input(job_id) == (image, "a.png", {"seed": 1})
    grown = _kept_bytes(store) - before
    assert grown < len(image), f"{grown} bytes more kept for 20 retries of one image of {len(image)}"


def test_finished_jobs_images_beyond_the_bound_go_oldest_first_and_unfinished_ones_stay(stores):
    size = 100_000
    store = stores(input_keep=3 * size)
    images = [os.urandom(size) for _ in range(5)]
    finished = [store.submit(image, f"{n}.png", {}, per_worker=10).id for n, image in enumerate(images[:4])]
    for job_id in finished:
        store.cancel(job_id)
    waiting = store.submit(images[4], "4.png", {}, per_worker=10).id
    # Three images' bytes kept: the waiting job's, and the two newest finished ones'.
    assert [store.input(job_id) is not None for job_id in finished] == [False, False, True, True]
    assert store.claim("a").image == images[4] and store.input(waiting)[0] == images[4]


def test_svd_input_keep_is_a_size(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVD_INPUT_KEEP", "2GB")
    assert Settings.from_env().input_keep == 2 * 1000**3
    monkeypatch.setenv("SVD_INPUT_KEEP", "500")
    with pytest.raises(ConfigError, match="SVD_INPUT_KEEP='500' is not a size"):
        Settings.from_env()


def test_a_late_retry_of_a_delivery_another_sender_delivered_does_not_bring_it_back(stores):
    store = stores()
    job_id = store.submit(b"x", "a.png", {}, per_worker=10, hook=Webhook("https://example.com/h")).id
    assert store.notify(job_id, "completed", b"end")
    delivery = store.next_delivery(lease=30)
    # Two tries overlapped: the one that got 2xx forgot the delivery, the other then asks to retry it.
    store.delivered(delivery.id)
    store.retry_delivery(delivery.id, 1, time.time() - 1)
    assert store.next_delivery(lease=30) is None
    assert store.next_delivery(lease=30) is None


def test_a_lapsed_lease_behind_ten_live_ones_is_taken_again(tmp_path: Path):
    """XAUTOCLAIM looks at ten pending entries per one it may claim: the claim walks its cursor."""
    with redis_server(tmp_path / "redis") as server:
        store = RedisJobs(server.url, lease=SHORT_LEASE)
        ids = [store.submit(b"x", f"{index}.png", {}, per_worker=20).id for index in range(11)]
        live = [store.claim(f"busy-{index}") for index in range(10)]
        dies = store.claim("dies")
        assert [claim.id for claim in [*live, dies]] == ids

        def renewed_then_claimed():
            assert all(store.renew(claim) for claim in live), "the live leases are renewed"
            return store.claim("idle")

        again = wait_until(renewed_then_claimed, 30, 0.05, "the lapsed job taken again")
        assert (again.id, again.attempt) == (dies.id, 2)


def test_an_attempt_that_lost_its_job_removes_only_its_own_video_not_the_winners(stores, tmp_path: Path):
    store = stores(lease=SHORT_LEASE)
    outputs = Outputs(tmp_path / "outputs", Retention(count=10))
    job_id = store.submit(b"x", "a.png", {}, per_worker=10).id
    stale = store.claim("cut-off")
    # Cut off from the store longer than a lease: another worker takes the job and ends it first.
    winner = wait_until(lambda: store.claim("winner"), 30, 0.05, "the lapsed job taken again")
    videos = {}
    for claim in (winner, stale):
        videos[claim.attempt] = tmp_path / f"attempt-{claim.attempt}.mp4"
        videos[claim.attempt].write_bytes(f"the video of attempt {claim.attempt}".encode())
    assert keep_video(outputs, winner, videos[2], {"attempt": 2}, lambda: store.finish(winner, COMPLETED))
    assert not keep_video(outputs, stale, videos[1], {"attempt": 1}, lambda: store.finish(stale, COMPLETED))
    video, record = outputs.find(job_id)
    assert video.read_bytes() == b"the video of attempt 2" and record["attempt"] == 2
    assert sorted(path.name for path in outputs.storage.path.iterdir()) == [f"{job_id}.json", f"{job_id}.mp4"]


@pytest.mark.parametrize("url", ["redis//svd:hunter2-password@redis:6379/0", "http://svd:hunter2-password@redis/0"])
def test_a_malformed_queue_url_is_refused_without_showing_its_password(url: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVD_QUEUE_URL", url)
    with pytest.raises(ConfigError, match="not a Redis URL") as refused:
        Settings.from_env()
    assert "hunter2" not in str(refused.value)


def test_a_jobs_file_from_before_webhooks_is_brought_up_to_date_by_workers_opening_it_at_once(tmp_path: Path):
    path = tmp_path / "jobs.db"
    job_id = SQLiteJobs(path).submit(b"x", "a.png", {"seed": 1}, per_worker=10).id
    with sqlite3.connect(path) as old:
        old.execute("ALTER TABLE jobs DROP COLUMN webhook")
        old.execute("ALTER TABLE jobs DROP COLUMN webhook_events")
    together = threading.Barrier(4)
    opened: list[SQLiteJobs] = []
    failed: list[BaseException] = []

    def open_store() -> None:
        together.wait()
        try:
            opened.append(SQLiteJobs(path))
        except BaseException as exc:
            failed.append(exc)

    workers = [threading.Thread(target=open_store) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert not failed and len(opened) == 4
    assert opened[0].claim("a").controls == {"seed": 1}, "the job made before is kept"
    assert opened[1].submit(b"x", "b.png", {}, per_worker=10, hook=Webhook("https://example.com/h")).id != job_id


def test_cancel_stops_a_waiting_job_from_starting_and_a_running_one_at_its_next_report(stores):
    store = stores()
    running_id = store.submit(b"x", "a.png", {}, per_worker=10).id
    waiting_id = store.submit(b"x", "b.png", {}, per_worker=10).id
    running = store.claim("a")
    assert store.report(running, Progress("denoise", 1, 25))
    job, canceled = store.cancel(waiting_id)
    assert canceled and job.status == CANCELED
    job, canceled = store.cancel(running_id)
    assert canceled and job.status == CANCELED
    assert not store.report(running, Progress("denoise", 2, 25)) and not store.renew(running)
    assert store.claim("b") is None, "a cancelled job never starts"
    assert store.get(running_id).progress == Progress("denoise", 1, 25)
    job, canceled = store.cancel(running_id)
    assert not canceled and job.status == CANCELED
    with pytest.raises(UnknownJob):
        store.cancel("0" * 32)
    assert store.depth() == QueueDepth(0, 0, 0.0)


def test_gpu_turns_are_granted_in_the_order_asked(tmp_path: Path):
    turns = Turns()
    order: list[int] = []
    turns.acquire()
    asking: list[threading.Thread] = []
    for index in range(4):
        thread = threading.Thread(target=lambda index=index: (turns.acquire(), order.append(index), turns.release()))
        thread.start()
        asking.append(thread)
        # Each asks only once the one before it is waiting.
        wait_until(lambda: len(turns._waiting) == index + 1, 30, 0.01, "waiting")
    turns.release()
    for thread in asking:
        thread.join(30)
    assert order == [0, 1, 2, 3]


def test_a_job_whose_gpu_fails_is_left_to_another_worker_not_failed(tmp_path: Path):
    """A poisoned CUDA context (injected) ends the worker's use, not the job: its lease lapses."""
    from svd.base.retention import Retention
    from svd.base.settings import Settings
    from svd.jobs.runner import JobRunner
    from svd.serving.engine import Engine
    from svd.storage.outputs import Outputs

    engine = Engine(Settings(model_id="tiny", device="cpu"))
    assert engine.wait_ready(120), engine.state.message
    engine.faults.inject("decode", 1, "device_error")
    store = SQLiteJobs(tmp_path / "jobs.db", lease=1)
    job_id = store.submit(PHOTO.read_bytes(), PHOTO.name, {**SMALL, "seed": 1}, per_worker=10).id
    JobRunner(engine, store, Outputs(tmp_path / "outputs", Retention(count=10)), lease=1).start()
    wait_until(lambda: not engine.alive, 60, 0.05, "the GPU failed")
    assert store.get(job_id).status == IN_PROGRESS, "not failed: the job was not at fault"
    retaken = wait_until(lambda: store.claim("another worker"), 10, 0.1, "the job taken by another worker")
    assert (retaken.id, retaken.attempt) == (job_id, 2)


def _submit(server: Server, **data) -> str:
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{server.url}/generate_task/submit", files=files, data={**SMALL, **data}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == PENDING
    return response.json()["task_id"]


def _status(server: Server, task_id: str) -> dict:
    return httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id}, timeout=30).json()


def _progress(server: Server, task_id: str) -> dict:
    return httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=30).json()


def _denoising(server: Server, task_id: str) -> int:
    """The denoising step the job has reported, 0 before the first."""
    progress = _progress(server, task_id)
    if progress["stage"] != "denoise":
        return 0
    assert progress["steps"] == SLOW["num_inference_steps"], progress
    return progress["step"]


def _finished(server: Server, task_id: str) -> str | None:
    status = _status(server, task_id)["status"]
    return None if status in (PENDING, IN_PROGRESS) else status


def _fetch(server: Server, task_id: str, path: Path) -> httpx.Response:
    response = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-output-id"] == task_id and "denoise;dur=" in response.headers["server-timing"]
    path.write_bytes(response.content)
    assert len(decode_video(path).frames) == SMALL["num_frames"]
    return response


def test_cancel_frees_the_gpu_for_the_next_job_and_a_cancelled_job_never_runs_again(tmp_path: Path):
    with serve(tmp_path) as server:
        running = _submit(server, **SLOW)
        waiting = _submit(server, **SLOW)
        after = _submit(server, seed="3")
        wait_until(lambda: _denoising(server, running) >= 2, 60, 0.05, "the first job denoising")

        cancel = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": waiting}, timeout=30)
        assert cancel.status_code == 200 and cancel.json()["status"] == CANCELED
        cancel = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": running}, timeout=30)
        assert cancel.status_code == 200 and cancel.json()["status"] == CANCELED
        step_at_cancel = _denoising(server, running)

        # The job after them starts: the cancelled one let go of the GPU. (That a stop comes at the
        # very next step is proved in-process, by the steps reported: test_deepcache.py.)
        wait_until(lambda: _status(server, after)["status"] != PENDING, 60, 0.05, "the next job started")
        assert wait_until(lambda: _finished(server, after), 120, 0.1, "the next job finished") == COMPLETED
        _fetch(server, after, tmp_path / "after.mp4")
        assert _denoising(server, running) <= step_at_cancel + 1, "the cancelled job went on denoising"
        assert _status(server, running)["status"] == _status(server, waiting)["status"] == CANCELED
        assert _progress(server, waiting)["stage"] == "queued", "the waiting job never started"

        again = httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": running}, timeout=30)
        assert again.status_code == 409 and again.json()["status"] == CANCELED
        assert "already finished" in again.json()["error"]
        fetched = httpx.get(f"{server.url}/generate_task/get", params={"task_id": running}, timeout=30)
        assert fetched.status_code == 409 and "canceled" in fetched.json()["error"]
        log = server.log_text()
    assert re.search(rf"SVD job {running} canceled on worker 1, attempt 1, after [\d.]+ s", log)
    assert f"SVD job {waiting} started" not in log
    assert re.search(rf"SVD job {after} completed on worker 1, attempt 1, in [\d.]+ s", log)


def test_a_job_whose_worker_is_killed_runs_again_and_the_jobs_behind_it_run(tmp_path: Path):
    with serve(tmp_path, env={"SVD_JOB_LEASE": LEASE}) as server:
        (killed_worker,) = server.workers()
        victim = _submit(server, **SLOW, seed="11")
        behind = [_submit(server, seed=str(seed)) for seed in (12, 13)]
        wait_until(lambda: _denoising(server, victim) >= 2, 60, 0.05, "the job denoising")
        os.kill(killed_worker, signal.SIGKILL)

        # BentoML starts a new worker; once the dead one's lease lapses, the job runs again.
        assert _status(server, victim)["status"] == IN_PROGRESS, "a crashed job is not lost"
        assert wait_until(lambda: _finished(server, victim), 180, 0.2, "the job finished") == COMPLETED
        assert _status(server, victim)["attempt"] == 2
        for task_id in behind:
            assert wait_until(lambda: _finished(server, task_id), 120, 0.2, "a job behind finished") == COMPLETED
        video = _fetch(server, victim, tmp_path / "victim.mp4")
        assert video.headers["x-seed"] == "11" and json.loads(video.headers["x-settings"])["num_inference_steps"] == 100
        assert killed_worker not in server.workers()
        log = server.log_text()
    assert re.search(rf"SVD job {victim} started on worker 1, attempt 1\n", log)
    assert f"SVD job {victim} started on worker 1, attempt 2, retried after its worker stopped 1 time(s)" in log


def _alive(pid: int) -> bool:
    """Running, not ended (a zombie has ended, whoever reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _refused(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_server_killed_with_jobs_waiting_runs_them_after_a_restart_and_leaves_no_worker_behind(tmp_path: Path):
    with serve(tmp_path, env={"SVD_JOB_LEASE": LEASE}) as first:
        done = _submit(first, seed="21")
        wait_until(lambda: _finished(first, done), 120, 0.1, "the first job finished")
        kept = _fetch(first, done, tmp_path / "done.mp4")
        running = _submit(first, **SLOW, seed="22")
        waiting = [_submit(first, seed=str(seed)) for seed in (23, 24)]
        wait_until(lambda: _denoising(first, running) >= 2, 60, 0.05, "a job denoising")
        (worker,) = first.workers()
        os.killpg(first.process.pid, signal.SIGKILL)  # the server, as the out-of-memory killer would
        first.process.wait(10)
        # Its worker does not live on: it would keep the port, the model and the job.
        port = int(first.url.rsplit(":", 1)[1])
        wait_until(lambda: not _alive(worker) and _refused(port), 10, 0.05, "the orphaned worker gone, the port free")

    with serve(tmp_path, env={"SVD_JOB_LEASE": LEASE}) as second:
        for task_id in (running, *waiting):
            assert (
                wait_until(lambda: _finished(second, task_id), 180, 0.2, "a job finished after the restart")
                == COMPLETED
            )
        again = _fetch(second, done, tmp_path / "again.mp4")
        assert again.content == kept.content, "a job finished before the crash is fetched as it was"
        assert httpx.get(f"{second.url}/outputs/{done}", timeout=30).content == kept.content
        assert _status(second, running)["attempt"] == 2 and _status(second, waiting[0])["attempt"] == 1
        for task_id in (running, *waiting):
            _fetch(second, task_id, tmp_path / f"{task_id}.mp4")


def test_a_submit_beyond_the_queue_is_429_with_retry_after(server: Server):
    """The shared server queues SVD_MAX_QUEUE (4) jobs for its one worker."""
    def busy() -> float:
        text = httpx.get(f"{server.url}/metrics", timeout=60).text
        found = re.search(r'svd_requests_refused_total\{reason="busy"\} ([\d.]+)', text)
        return float(found.group(1)) if found else 0.0

    refused_before = busy()
    queued = [_submit(server, **SLOW) for _ in range(4)]
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    refused = httpx.post(f"{server.url}/generate_task/submit", files=files, data=SMALL, timeout=30)
    assert busy() == refused_before + 1, "counted as a refusal"
    for task_id in queued:
        httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task_id}, timeout=30)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    assert "4 jobs are already waiting or running" in refused.json()["error"]


def test_sigterm_lets_the_running_job_finish_and_starts_no_other(tmp_path: Path):
    with serve(tmp_path) as server:
        running = _submit(server, **SLOW)
        waiting = _submit(server)
        wait_until(lambda: _denoising(server, running) >= 2, 60, 0.05, "the job denoising")
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(120)
    store = SQLiteJobs(tmp_path / "outputs" / "jobs.db")
    assert store.get(running).status == COMPLETED and store.get(waiting).status == PENDING
    assert (tmp_path / "outputs" / f"{running}.mp4").is_file()


def test_the_readme_client_example_waits_for_the_job_and_gets_its_video(server: Server, tmp_path: Path):
    readme = (ROOT / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in readme.split("### Async jobs", 1)[1].split("```python\n")[1:]]
    example = next(block for block in blocks if "SyncHTTPClient" in block)
    assert 'task.get_status().value in ("pending", "in_progress")' in example
    # Only the address, the photo's path and the size change: the default size takes minutes here.
    code = (
        example.replace("http://localhost:3000", server.url)
        .replace('Path("assets/rocket.jpg")', f"Path({str(PHOTO)!r})")
        .replace("seed=42)", f"seed=42, **{SMALL!r})")
    )
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert len(decode_video(namespace["video"]).frames) == SMALL["num_frames"]


@pytest.mark.parametrize(
    ("method", "route", "status"),
    [
        ("GET", "/generate_task/status", 404),
        ("GET", "/generate_task/get", 404),
        ("PUT", "/generate_task/cancel", 404),
        ("POST", "/generate_task/retry", 404),
        ("GET", "/generate_task/status?malformed", 400),
        ("PUT", "/generate_task/cancel?malformed", 400),
    ],
)
def test_an_unknown_task_is_404_naming_it_and_a_malformed_id_400(server: Server, method: str, route: str, status: int):
    task_id = "0" * 32 if status == 404 else "../outputs"
    response = httpx.request(method, f"{server.url}{route.split('?')[0]}", params={"task_id": task_id}, timeout=30)
    assert response.status_code == status and task_id in response.json()["error"]
    progress = httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=30)
    assert progress.status_code == status and task_id in progress.json()["error"]


def test_get_of_an_unfinished_job_is_400_naming_its_status(server: Server):
    task_id = _submit(server, **SLOW)
    response = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id}, timeout=30)
    assert response.status_code == 400
    assert response.json()["status"] in (PENDING, IN_PROGRESS) and "not completed yet" in response.json()["error"]
    assert httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task_id}, timeout=30).status_code == 200


def test_a_submit_that_cannot_run_is_refused_at_once(server: Server):
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    bad_field = httpx.post(
        f"{server.url}/generate_task/submit", files=files, data={**SMALL, "width": "1000"}, timeout=30
    )
    assert (
        bad_field.status_code == 400
        and "width" in bad_field.json()["error"]
        and "multiple of 64" in bad_field.json()["error"]
    )
    both = {**SMALL, "min_guidance_scale": "5", "max_guidance_scale": "2"}
    guidance = httpx.post(f"{server.url}/generate_task/submit", files=files, data=both, timeout=30)
    assert guidance.status_code == 400 and "must not be above" in guidance.json()["error"]
    text = {"image": ("notes.png", b"not an image", "image/png")}
    not_image = httpx.post(f"{server.url}/generate_task/submit", files=text, data=SMALL, timeout=30)
    assert not_image.status_code == 415 and "not an image" in not_image.json()["error"]
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    refused = httpx.post(f"{server.url}/generate_task/submit", headers=headers, content=b"garbage", timeout=30)
    assert refused.status_code == 400, "refused at once, never a job"
    assert "could not be read as multipart/form-data" in refused.json()["error"], refused.text
