"""Many users, one GPU pool (svd/base/users.py, svd/jobs/fair.py): named tokens, jobs and videos that
are their owner's, fair turns and a bound per user; on both stores, through the routes, and on a
served replica pair sharing Redis."""

from __future__ import annotations

import asyncio
import re
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from harness import PHOTO, Server, _ready, decode_video, redis_server, require_redis_server, serve, wait_until
from svd.base.settings import ConfigError, Settings
from svd.base.users import parse_users
from svd.http.middleware.auth import BearerAuth
from svd.http.outputs_routes import library_app
from svd.http.request_fields import JobInput
from svd.http.task_routes import JobRoutes
from svd.jobs.fair import HALF_LIFE_SECONDS, turn_order
from svd.jobs.model import IN_PROGRESS, PENDING, Speeds, Unfinished, UserQueueFull
from svd.jobs.store import JobStore
from svd.storage.outputs import Outputs
from tests.test_jobs import stores  # noqa: F401  (the fixture: both stores)

ROUTE = "/generate_task"
TINY = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 3}
TOKENS = {"ann": "ann-secret-token-1", "bob": "bob-secret-token-2"}
ADMIN_TOKEN = "admin-secret-token-0"


def _submit(store: JobStore, owner: str, seed: int = 0, per_user: int = 0) -> str:
    return store.submit(b"image", "photo.png", {"seed": seed}, per_worker=100, owner=owner, per_user=per_user).id


def test_tokens_are_named_pairs_and_a_bad_entry_is_named_without_its_token(monkeypatch, tmp_path: Path):
    assert parse_users("ann:a1, bob:b:2\n# a comment\n\ncarl:c3", "SVD_API_TOKENS") == {
        "ann": "a1",
        "bob": "b:2",
        "carl": "c3",
    }
    for text, why in (
        ("ann", "entry 1 is not `name:token`"),
        ("ann:a1,ann:a2", "'ann' is named twice"),
        ("ann:a1,bob:a1", "another user's token"),
        ("admin:x1", "`admin` is SVD_API_TOKEN's"),
        ("ann smith:x1", "entry 1 names the user 'ann smith'"),
    ):
        with pytest.raises(ValueError, match=why) as refused:
            parse_users(text, "SVD_API_TOKENS")
        assert "x1" not in str(refused.value) and "a2" not in str(refused.value)

    secret = tmp_path / "tokens"
    secret.write_text("ann:from-the-file\n")
    monkeypatch.setenv("SVD_API_TOKENS_FILE", str(secret))
    assert Settings.from_env().api_tokens == (("ann", "from-the-file"),)
    monkeypatch.setenv("SVD_API_TOKENS", "bob:b")
    with pytest.raises(ConfigError, match="both set"):
        Settings.from_env()
    monkeypatch.delenv("SVD_API_TOKENS")
    monkeypatch.setenv("SVD_API_TOKEN", "from-the-file")
    with pytest.raises(ConfigError, match="the admin's token"):
        Settings.from_env()
    monkeypatch.delenv("SVD_API_TOKEN")
    monkeypatch.setenv("SVD_MAX_QUEUE_PER_USER", "-1")
    with pytest.raises(ConfigError, match="SVD_MAX_QUEUE_PER_USER"):
        Settings.from_env()


def test_a_free_gpu_takes_the_job_of_the_user_with_the_least_gpu_time(stores):  # noqa: F811
    store = stores()
    ann = [_submit(store, "ann", seed) for seed in range(5)]
    first = store.claim("w1")
    assert first.id == ann[0] and first.owner == "ann"
    bob = _submit(store, "bob")
    # Ann has run a job and Bob none: his one job is next, before her four waiting ones.
    assert [job.id for job in store.unfinished()] == [ann[0], bob, *ann[1:]]
    assert store.finish(first, "completed")
    assert store.claim("w1").id == bob
    # Then Ann's, oldest first, while Bob has nothing waiting.
    assert store.claim("w2").id == ann[1]
    assert store.depth().by_owner == {"ann": (3, 1), "bob": (0, 1)}


def test_with_equal_time_the_oldest_job_goes_first_and_time_decides_the_rest(stores):  # noqa: F811
    store = stores()
    a1, b1, a2, b2 = _submit(store, "ann"), _submit(store, "bob"), _submit(store, "ann"), _submit(store, "bob")
    assert [store.claim("w").id for _ in range(2)] == [a1, b1]
    # Both running: whoever started first has run longer, so the other's next job goes first.
    assert store.claim("w").id == b2 and store.claim("w").id == a2


def test_a_user_at_their_bound_is_refused_while_another_is_accepted(stores):  # noqa: F811
    store = stores()
    for seed in range(2):
        _submit(store, "ann", seed, per_user=2)
    with pytest.raises(UserQueueFull) as full:
        _submit(store, "ann", 3, per_user=2)
    assert (full.value.unfinished, full.value.limit) == (2, 2)
    _submit(store, "bob", per_user=2)
    claim = store.claim("w")
    assert claim.owner == "ann" and store.finish(claim, "completed")
    _submit(store, "ann", 4, per_user=2)  # one of hers ended: room again


def test_gpu_time_is_forgotten_by_half_every_half_life():
    speeds = Speeds({}, None)
    now = 10_000.0
    queue = [Unfinished("a", PENDING, None, {}, "ann", 1.0), Unfinished("b", PENDING, None, {}, "bob", 2.0)]
    # Ann ran 100 s one half-life ago (50 now), Bob 60 s just now: Ann's job goes first.
    kept = [("ann", 100.0, now - HALF_LIFE_SECONDS), ("bob", 60.0, now)]
    assert [job.id for job in turn_order(queue, kept, speeds, now)] == ["a", "b"]
    # And a running job counts the seconds it has run so far.
    running = Unfinished("r", IN_PROGRESS, now - 20, {}, "ann", 0.0)
    assert [job.id for job in turn_order([running, *queue], kept, speeds, now)] == ["r", "b", "a"]


def _routes(store: JobStore, outputs: Outputs, per_user: int = 0):
    routes = JobRoutes(
        library_app(outputs),
        ROUTE,
        lambda: store,
        JobInput,
        per_worker=100,
        outputs=outputs,
        max_pixels=10**8,
        per_user=per_user,
        users=frozenset(TOKENS),
    )
    return BearerAuth(routes, admin=ADMIN_TOKEN, users=TOKENS)


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_every_route_answers_another_users_job_and_video_as_missing(stores, tmp_path: Path):  # noqa: F811
    store, outputs = stores(), Outputs(tmp_path / "outputs", Settings().output_keep)
    app = _routes(store, outputs, per_user=1)

    async def scenario() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://svd") as client:

            async def submit(token: str, key: str) -> httpx.Response:
                return await client.post(
                    f"{ROUTE}/submit",
                    files={"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")},
                    data={name: str(value) for name, value in TINY.items()},
                    headers={**_as(token), "Idempotency-Key": key},
                )

            ann_job = (await submit(TOKENS["ann"], "same-key")).json()["task_id"]
            answers = {"bob's submit with ann's key": await submit(TOKENS["bob"], "same-key")}
            answers["ann over her bound"] = await submit(TOKENS["ann"], "another-key")
            bob_job = answers["bob's submit with ann's key"].json()["task_id"]
            # Ann's job ends with a video, kept as the runner keeps one.
            claim = store.claim("w")
            video = tmp_path / "made.mp4"
            video.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(100))
            record = {"content_type": "video/mp4", "seed": 1, "settings": {}, "stage_seconds": {}, "worker": 1}
            outputs.save(claim.id, video, {**record, "created": "2026-12-07T00:00:00+00:00", "owner": claim.owner})
            assert claim.id == ann_job and store.finish(claim, "completed")
            query = {"task_id": ann_job}
            for token, who in ((TOKENS["bob"], "bob"), (TOKENS["ann"], "ann"), (ADMIN_TOKEN, "admin")):
                asked = {
                    "status": client.get(f"{ROUTE}/status", params=query, headers=_as(token)),
                    "events": client.get(f"{ROUTE}/events", params=query, headers=_as(token)),
                    "preview": client.get(f"{ROUTE}/preview", params=query, headers=_as(token)),
                    "get": client.get(f"{ROUTE}/get", params=query, headers=_as(token)),
                    "retry": client.post(f"{ROUTE}/retry", params=query, headers=_as(token)),
                    "output": client.get(f"/{ann_job}", headers=_as(token)),
                    "list": client.get("/", headers=_as(token)),
                }
                for name, pending in asked.items():
                    answers[f"{who} {name}"] = await pending
                answers[f"{who} cancel"] = await client.put(
                    f"{ROUTE}/cancel", params={"task_id": bob_job}, headers=_as(token)
                )
            return answers

    answers = asyncio.run(scenario())
    # Keys are per user: Bob's key is his own, and queued his job.
    assert answers["bob's submit with ann's key"].status_code == 200
    assert answers["ann over her bound"].status_code == 429 and "Retry-After" in answers["ann over her bound"].headers
    assert "SVD_MAX_QUEUE_PER_USER" in answers["ann over her bound"].json()["error"]
    for route in ("status", "events", "preview", "get", "retry", "output"):
        assert answers[f"bob {route}"].status_code == 404, (route, answers[f"bob {route}"].text)
        assert "no task" in answers[f"bob {route}"].text or "no output" in answers[f"bob {route}"].text
    for who in ("ann", "admin"):
        assert answers[f"{who} status"].json()["status"] == "completed"
        assert answers[f"{who} get"].status_code == 200 and answers[f"{who} output"].status_code == 200
        assert answers[f"{who} events"].status_code == 200 and b"event: completed" in answers[f"{who} events"].content
        assert answers[f"{who} preview"].status_code == 404 and "no preview" in answers[f"{who} preview"].text
    # The retry by Ann and the admin's are Ann's jobs: the second is over her bound of one.
    assert answers["ann retry"].status_code == 200 and answers["admin retry"].status_code == 429
    # Bob's job: Ann cannot cancel it (as if it did not exist), Bob can, and then the admin finds it ended.
    assert answers["ann cancel"].status_code == 404
    assert answers["bob cancel"].status_code == 200 and answers["bob cancel"].json()["status"] == "canceled"
    assert answers["admin cancel"].status_code == 409
    listed = {
        who: [record["id"] for record in answers[f"{who} list"].json()["outputs"]] for who in ("ann", "bob", "admin")
    }
    assert listed == {"ann": [answers["ann status"].json()["task_id"]], "bob": [], "admin": listed["ann"]}


# The longest job there is: it holds its worker's GPU until the test cancels it.
HOLD = {**TINY, "width": 512, "height": 512, "num_inference_steps": 100, "segments": 4}
USERS_ENV = {
    "SVD_API_TOKENS": ",".join(f"{name}:{token}" for name, token in TOKENS.items()),
    "SVD_API_TOKEN": ADMIN_TOKEN,
    "SVD_MAX_QUEUE": "10",
    "SVD_MAX_QUEUE_PER_USER": "5",
}


def _post_job(server: Server, token: str, **controls: int) -> httpx.Response:
    return httpx.post(
        f"{server.url}{ROUTE}/submit",
        files={"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")},
        data={name: str(value) for name, value in {**TINY, **controls}.items()},
        headers=_as(token),
        timeout=60,
    )


def _job_of(server: Server, token: str, **controls: int) -> str:
    answer = _post_job(server, token, **controls)
    assert answer.status_code == 200, answer.text
    return answer.json()["task_id"]


def _status(server: Server, token: str, task_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}{ROUTE}/status", params={"task_id": task_id}, headers=_as(token), timeout=30)


def _started(server: Server, task_id: str) -> float:
    """When the job was taken by a worker, as the store says (the admin sees every job)."""
    return datetime.fromisoformat(_status(server, ADMIN_TOKEN, task_id).json()["executed_at"]).timestamp()


def _wait_status(server: Server, task_id: str, status: str, timeout: float = 180) -> None:
    wait_until(lambda: _status(server, ADMIN_TOKEN, task_id).json()["status"] == status, timeout, 0.1, status)


def _gauges(server: Server, name: str) -> dict[str, float]:
    """A labelled metric's value per user, from /metrics."""
    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return {user: float(value) for user, value in re.findall(rf'^{name}\{{user="([^"]*)"\}} (\S+)$', text, re.M)}


def _no_token_in(log: str) -> None:
    for token in (*TOKENS.values(), ADMIN_TOKEN):
        assert token not in log


def test_two_users_and_an_admin_on_one_server_see_their_own_and_take_fair_turns(tmp_path: Path):
    with serve(tmp_path, USERS_ENV) as server:
        ann, bob = TOKENS["ann"], TOKENS["bob"]
        holder = _job_of(server, ann, **HOLD)
        _wait_status(server, holder, IN_PROGRESS)
        ann_jobs = [_job_of(server, ann, seed=seed) for seed in range(4)]
        # Ann has five waiting or running, her bound: refused, with when to come back; Bob is not.
        over = _post_job(server, ann)
        assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1, over.text
        assert "SVD_MAX_QUEUE_PER_USER" in over.json()["error"]
        bob_job = _job_of(server, bob)
        assert _gauges(server, "svd_user_jobs_waiting") == {"ann": 4, "bob": 1, "admin": 0, "anonymous": 0}
        assert _gauges(server, "svd_user_jobs_running") == {"ann": 1, "bob": 0, "admin": 0, "anonymous": 0}

        # Ann's running job is hers: Bob gets what he would for no job at all, on every route.
        preview = wait_until(
            lambda: httpx.post(f"{server.url}/progress", json={"task_id": holder}, headers=_as(ann), timeout=30).json()[
                "preview"
            ],
            120,
            0.2,
            "a preview",
        )
        assert httpx.get(f"{server.url}{preview}", headers=_as(ann), timeout=30).status_code == 200
        missing = {
            "error": f"no task {holder}: never submitted here, or finished more than a day ago and its video pruned"
        }
        query = {"task_id": holder}
        asked_by_bob = {
            "preview": httpx.get(f"{server.url}{preview}", headers=_as(bob), timeout=30),
            "status": _status(server, bob, holder),
            "progress": httpx.post(f"{server.url}/progress", json=query, headers=_as(bob), timeout=30),
            "events": httpx.get(f"{server.url}{ROUTE}/events", params=query, headers=_as(bob), timeout=30),
            "get": httpx.get(f"{server.url}{ROUTE}/get", params=query, headers=_as(bob), timeout=30),
            "retry": httpx.post(f"{server.url}{ROUTE}/retry", params=query, headers=_as(bob), timeout=30),
            "cancel": httpx.put(f"{server.url}{ROUTE}/cancel", params=query, headers=_as(bob), timeout=30),
        }
        for route, answer in asked_by_bob.items():
            assert answer.status_code == 404 and answer.json()["error"] == missing["error"], (route, answer.text)
        assert _status(server, ann, holder).json()["status"] == IN_PROGRESS, "Bob's cancel did nothing"

        # The admin frees the GPU: Bob's one job goes before Ann's four, which waited longer.
        assert (
            httpx.put(f"{server.url}{ROUTE}/cancel", params=query, headers=_as(ADMIN_TOKEN), timeout=30).json()[
                "status"
            ]
            == "canceled"
        )
        for job in (bob_job, *ann_jobs):
            _wait_status(server, job, "completed")
        assert _started(server, bob_job) < min(_started(server, job) for job in ann_jobs)

        # Videos: the tutorial's synchronous route keeps Bob's as his; each lists and fetches their own.
        made = httpx.post(
            f"{server.url}/generate",
            files={"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")},
            data={name: str(value) for name, value in TINY.items()},
            headers=_as(bob),
            timeout=120,
        )
        assert made.status_code == 200, made.text
        bob_videos = {made.headers["X-Output-Id"], bob_job}
        listed = {
            token: {
                record["id"]
                for record in httpx.get(
                    f"{server.url}/outputs/", params={"limit": 100}, headers=_as(token), timeout=30
                ).json()["outputs"]
            }
            for token in (ann, bob, ADMIN_TOKEN)
        }
        assert listed == {ann: set(ann_jobs), bob: bob_videos, ADMIN_TOKEN: {*ann_jobs, *bob_videos}}
        for video in bob_videos:
            assert httpx.get(f"{server.url}/outputs/{video}", headers=_as(ann), timeout=30).status_code == 404
            for token in (bob, ADMIN_TOKEN):
                answer = httpx.get(f"{server.url}/outputs/{video}", headers=_as(token), timeout=30)
                assert answer.status_code == 200 and answer.headers["content-type"] == "video/mp4"
        own = httpx.get(f"{server.url}{ROUTE}/get", params={"task_id": ann_jobs[0]}, headers=_as(ann), timeout=30)
        (tmp_path / "ann.mp4").write_bytes(own.content)
        assert len(decode_video(tmp_path / "ann.mp4").frames) == TINY["num_frames"]
        assert (
            httpx.get(
                f"{server.url}{ROUTE}/get", params={"task_id": ann_jobs[0]}, headers=_as(bob), timeout=30
            ).status_code
            == 404
        )

        used = _gauges(server, "svd_user_gpu_seconds_total")
        assert used["ann"] > 0 and used["bob"] > 0, used
        log = server.log_text()
        assert (
            f"SVD job {ann_jobs[0]} submitted by ann" in log and f"SVD job {holder} canceled by request of admin" in log
        )
        _no_token_in(log)


def test_fair_turns_and_the_bound_hold_across_two_replicas_sharing_redis(tmp_path: Path):
    require_redis_server()
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(tmp_path / "redis"))
        env = {**USERS_ENV, "SVD_QUEUE_URL": redis.url, "SVD_OUTPUT_DIR": str(tmp_path / "shared")}
        a, b = (stack.enter_context(serve(tmp_path / name, env, wait_ready=False)) for name in ("a", "b"))
        for replica in (a, b):
            wait_until(lambda: _ready(replica.url, replica.process, replica.log), 180, 0.5, "replica ready")
        ann, bob = TOKENS["ann"], TOKENS["bob"]
        # Ann's two long jobs hold both replicas' GPUs; her three short ones wait behind them.
        holders = [_job_of(a, ann, **HOLD) for _ in range(2)]
        for holder in holders:
            _wait_status(a, holder, IN_PROGRESS)
        ann_jobs = [_job_of(a, ann, seed=seed) for seed in range(3)]
        assert _post_job(b, ann).status_code == 429, "her bound, on the other replica too"
        bob_job = _job_of(b, bob)
        assert _status(a, ann, bob_job).status_code == 404 and _status(a, bob, bob_job).status_code == 200
        for holder in holders:
            canceled = httpx.put(f"{b.url}{ROUTE}/cancel", params={"task_id": holder}, headers=_as(ann), timeout=30)
            assert canceled.status_code == 200, canceled.text
        for job in (bob_job, *ann_jobs):
            _wait_status(b, job, "completed")
        # Whichever replica freed first took Bob's job, though Ann's three were older.
        assert _started(a, bob_job) < min(_started(a, job) for job in ann_jobs)
        assert {_ran_on((a, b), job) for job in holders} == {0, 1}, "both replicas' workers took part"
        video = httpx.get(f"{a.url}{ROUTE}/get", params={"task_id": bob_job}, headers=_as(bob), timeout=30)
        assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
        assert httpx.get(f"{b.url}/outputs/{bob_job}", headers=_as(ann), timeout=30).status_code == 404
        for replica in (a, b):
            _no_token_in(replica.log_text())


def _ran_on(replicas: tuple[Server, ...], task_id: str) -> int:
    (index,) = [i for i, replica in enumerate(replicas) if f"SVD job {task_id} started" in replica.log_text()]
    return index
