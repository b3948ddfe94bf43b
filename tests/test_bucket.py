"""Kept videos and live previews in an S3-compatible bucket (SVD_OUTPUT_DIR=s3://...), against a real
S3 API server (moto's) on a free port, stopped and started inside the tests: byte for byte with the
folder's headers, across a restart, retention, previews, and the bucket unreachable mid-run.
Two replicas sharing one bucket and no folder: tests/test_replicas.py."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from harness import PHOTO, S3, SMALL, s3_server, wait_until
from svd.base.retention import Retention
from svd.http.outputs_routes import library_app
from svd.storage.open import storage_at
from svd.storage.outputs import Outputs
from svd.storage.previews import previews_of

# Headers the service itself sets; FileResponse adds validators and ranges a stream has not.
SERVICE_HEADERS = (
    "content-type",
    "content-length",
    "content-disposition",
    "x-seed",
    "x-settings",
    "server-timing",
    "x-worker",
    "x-output-id",
)
TINY = {**SMALL, "num_frames": 4}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with s3_server() as server:
        yield server


@pytest.fixture
def bucket(s3: S3, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket for the test, and this process's boto3 pointed at the server."""
    for name, value in s3.env.items():
        monkeypatch.setenv(name, value)
    return s3.bucket(request.node.name.replace("_", "-")[:50].strip("-"))


def _record(seed: int) -> dict:
    return {
        "content_type": "video/mp4",
        "seed": seed,
        "settings": {"width": 64},
        "stage_seconds": {"denoise": 1.5},
        "worker": 1,
        "created": datetime.now(timezone.utc).isoformat(),
    }


def _age(bucket: str, key: str, seconds: float) -> None:
    """Make an object older, as os.utime does a file: S3 times are to the second."""
    from moto.s3.models import s3_backends

    partition, account = s3_backends.bucket_accounts[bucket]
    found = s3_backends[account][partition].get_bucket(bucket).keys[key]
    found.last_modified = found.last_modified - timedelta(seconds=seconds)


def test_a_video_in_the_bucket_comes_back_byte_for_byte_with_the_folder_s_headers_after_a_restart(
    s3: S3, bucket: str, tmp_path: Path
):
    video = tmp_path / "video.mp4"
    video.write_bytes(os.urandom(300_000))
    output_id = "ab" * 16
    in_folder = Outputs(tmp_path / "outputs", Retention(count=10))
    in_bucket = Outputs(storage_at(f"{bucket}/videos/"), Retention(count=10))
    for outputs in (in_folder, in_bucket):
        outputs.save(output_id, video, _record(7))
    name = bucket.removeprefix("s3://")
    assert set(s3.objects(name)) == {f"videos/{output_id}.mp4", f"videos/{output_id}.json"}

    answers = []
    for outputs in (in_folder, in_bucket):
        with TestClient(library_app(outputs)) as client:
            answers.append(client.get(f"/{output_id}"))
    from_folder, from_bucket = answers
    assert from_bucket.status_code == 200 and from_bucket.content == video.read_bytes()
    assert {header: from_bucket.headers[header] for header in SERVICE_HEADERS} == {
        header: from_folder.headers[header] for header in SERVICE_HEADERS
    }

    restarted = Outputs(storage_at(f"{bucket}/videos"), Retention(count=10))
    with TestClient(library_app(restarted)) as client:
        again = client.get(f"/{output_id}")
        listing = client.get("/").json()
    assert again.content == video.read_bytes() and again.headers["x-seed"] == "7"
    assert [record["id"] for record in listing["outputs"]] == [output_id]
    link = restarted.link(listing["outputs"][0]["file"])
    assert "X-Amz-Expires=86400" in link, "an expiring address"
    assert httpx.get(link, timeout=30).content == video.read_bytes(), "the presigned address serves the video"


def test_svd_output_keep_prunes_the_bucket_oldest_first(s3: S3, bucket: str, tmp_path: Path):
    name = bucket.removeprefix("s3://")
    outputs = Outputs(storage_at(bucket), Retention(count=2))
    ids = []
    for index in range(1, 4):
        video = tmp_path / f"{index}.mp4"
        video.write_bytes(b"x" * 100)
        ids.append(f"{index:032x}")
        outputs.save(ids[-1], video, _record(index))
        for key in (f"{ids[-1]}.mp4", f"{ids[-1]}.json"):
            _age(name, key, 100 - index)  # made a second or more apart, oldest first
    # Videos whose sidecar never came: one a save left an hour ago, one a save is writing now.
    abandoned, being_saved = f"{'e' * 32}.mp4", f"{'f' * 32}.mp4"
    for key in (abandoned, being_saved):
        s3.client().put_object(Bucket=name, Key=key, Body=b"x")
    _age(name, abandoned, 2 * 3600)
    outputs.prune()
    assert sorted(s3.objects(name)) == sorted(
        [being_saved, *(f"{output_id}{suffix}" for output_id in ids[1:] for suffix in (".json", ".mp4"))]
    )
    assert [record["id"] for record in outputs.recent(10)] == ids[:0:-1], "newest first"


def test_a_full_bucket_refuses_the_video_with_507_and_keeps_nothing(
    s3: S3, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """MinIO's answer past its free-space threshold; moto keeps no quota, so the client gets it here."""
    from botocore.exceptions import ClientError

    from svd.base.errors import Refused

    outputs = Outputs(storage_at(bucket), Retention(count=10))
    client = outputs.storage._client.get()
    real_put = client.put_object

    def full(**kwargs):
        if kwargs["Key"].endswith(".json"):
            message = "Storage backend has reached its minimum free drive threshold."
            raise ClientError({"Error": {"Code": "XMinioStorageFull", "Message": message}}, "PutObject")
        return real_put(**kwargs)

    monkeypatch.setattr(client, "put_object", full)
    video = tmp_path / "video.mp4"
    video.write_bytes(b"x" * 1000)
    with pytest.raises(Refused) as refused:
        outputs.put("cd" * 16, video, _record(1))
    assert refused.value.status == 507 and f"the output store {bucket}/ is full" in str(refused.value)
    assert s3.objects(bucket.removeprefix("s3://")) == {}, "the video went with its sidecar"


def test_the_bucket_stopped_mid_run_fails_the_job_with_a_503_naming_it_and_keeps_nothing_half_written(
    s3: S3, bucket: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    """One tiny-model runner and the task routes on a bucket: a preview served from it; the bucket
    stopped while a job denoises; then started again, with no trace of the failed job's video, and
    the next job kept, served and linked from its webhook's end event."""
    from svd.base.settings import Settings
    from svd.http.request_fields import JobInput
    from svd.http.task_routes import JobRoutes
    from svd.jobs.model import COMPLETED, FAILED, IN_PROGRESS, Webhook
    from svd.jobs.runner import JobRunner
    from svd.jobs.sqlite import SQLiteJobs
    from svd.serving.engine import Engine

    name = bucket.removeprefix("s3://")
    caplog.set_level(logging.INFO)
    engine = Engine(Settings(model_id="tiny", device="cpu"))
    assert engine.wait_ready(120), engine.state.message
    outputs = Outputs(storage_at(f"{bucket}/out"), Retention(count=10))
    store = SQLiteJobs(tmp_path / "jobs.db", lease=30)

    def routes() -> TestClient:
        # As a fresh replica's: nothing of the service but the bucket and the store.
        app = JobRoutes(
            Starlette(),
            "/generate_task",
            lambda: store,
            JobInput,
            10,
            Outputs(storage_at(f"{bucket}/out"), Retention(count=10)),
            10**8,
        )
        return TestClient(app)

    # The first denoising step's report holds the generation until the bucket is stopped: mid-run
    # on any machine, however fast.
    reached, resume = threading.Event(), threading.Event()
    report = store.report

    def holding(claim, progress):
        if progress.stage == "denoise" and not resume.is_set():
            reached.set()
            resume.wait(60)
        return report(claim, progress)

    monkeypatch.setattr(store, "report", holding)
    runner = JobRunner(engine, store, outputs, lease=30)
    runner.start()
    try:

        doomed = store.submit(PHOTO.read_bytes(), PHOTO.name, {**TINY, "seed": 1}, per_worker=10).id
        assert reached.wait(120), "denoising started"
        # The running job's preview, as its Previewer keeps it (the job's own waits behind the held
        # report), served from the bucket.
        shown = b"RIFF\x04\x00\x00\x00WEBP"
        previews_of(outputs).start(doomed, 600)(shown)
        with routes() as client:
            preview = client.get("/generate_task/preview", params={"task_id": doomed})
        assert preview.status_code == 200 and preview.headers["content-type"] == "image/webp"
        assert preview.content == shown == s3.objects(name)[f"out/previews/{doomed}.webp"]
        s3.stop()
        assert store.get(doomed).status == IN_PROGRESS, "stopped mid-run"
        resume.set()
        failed = wait_until(lambda: store.get(doomed).status == FAILED and store.get(doomed), 120, 0.2, "failed")
        assert failed.error_status == 503 and f"the output store {bucket}/out/" in failed.error, failed.error
        with routes() as client:
            answers = [
                client.get("/generate_task/get", params={"task_id": doomed}),
                client.get("/generate_task/preview", params={"task_id": doomed}),
            ]
        with TestClient(library_app(outputs)) as client:
            answers += [client.get("/"), client.get(f"/{doomed}")]
        assert [answer.status_code for answer in answers] == [503] * 4, [answer.text for answer in answers]
        assert all(f"{bucket}/out/" in answer.json()["error"] for answer in answers)

        s3.start()
        assert not [key for key in s3.objects(name) if doomed in key and "previews/" not in key], "nothing half-kept"
        with routes() as client:
            assert client.get("/generate_task/status", params={"task_id": doomed}).json()["status"] == FAILED

        # With the bucket back, a job is kept, served, and its end event links to its video.
        hook = Webhook("https://hooks.example/svd")
        made = store.submit(PHOTO.read_bytes(), PHOTO.name, {**TINY, "seed": 2}, per_worker=10, hook=hook).id
        wait_until(lambda: store.get(made).status == COMPLETED, 120, 0.2, "completed")
        with routes() as client:
            video = client.get("/generate_task/get", params={"task_id": made})
        assert video.status_code == 200 and video.content == s3.objects(name)[f"out/{made}.mp4"]
        assert video.headers["x-seed"] == "2" and video.headers["content-type"] == "video/mp4"
        ends = []
        while (delivery := store.next_delivery(30)) is not None:
            store.delivered(delivery.id)
            if delivery.job_id == made and json.loads(delivery.body)["type"] == "task.completed":
                ends.append(json.loads(delivery.body)["data"])
        (end,) = ends
        assert "X-Amz-Expires=86400" in end["output_url"], "a link that expires in a day"
        assert httpx.get(end["output_url"], timeout=30).content == video.content
    finally:
        resume.set()
        runner.stop(60)
    # What the service and its S3 client logged; the test's own HTTP client logs the links it follows.
    service = ("bentoml", "botocore", "boto3", "s3transfer", "urllib3")
    log = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith(service))
    assert f"SVD job {doomed}" in log
    assert s3.secret not in log and s3.env["AWS_ACCESS_KEY_ID"] not in log, "no credentials in the log"


def test_a_bucket_is_shared_storage_for_the_queue_and_the_job_store_stays_on_local_disk(
    monkeypatch: pytest.MonkeyPatch,
):
    from svd.base.settings import ConfigError, Settings

    monkeypatch.setenv("SVD_QUEUE_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("SVD_OUTPUT_DIR", "s3://videos/svd")
    monkeypatch.delenv("SVD_JOBS_DB", raising=False)
    settings = Settings.from_env()
    assert settings.output_dir == "s3://videos/svd" and settings.jobs_db == os.path.join("svd-jobs", "jobs.db")
    monkeypatch.setenv("SVD_OUTPUT_DIR", "s3:///svd")
    with pytest.raises(ConfigError, match="SVD_OUTPUT_DIR='s3:///svd' names no bucket"):
        Settings.from_env()


def test_attempts_in_the_bucket_a_loser_removes_only_its_own_and_a_reader_promotes_the_winner(
    bucket: str, tmp_path: Path
):
    """Issue 29's attempts on the bucket, where a promotion is a copy and a delete: the attempt that
    lost removes only its own video; the winner's, left unpromoted by a worker that stopped right after
    the store's finish, is promoted by the first reader of the job's video."""
    from svd.jobs.model import COMPLETED
    from svd.jobs.runner import keep_video
    from svd.jobs.sqlite import SQLiteJobs

    store = SQLiteJobs(tmp_path / "jobs.db", lease=30)
    outputs = Outputs(storage_at(f"{bucket}/videos"), Retention(count=10))
    job = store.submit(b"x", "a.png", {}, per_worker=10)
    winner = store.claim("winner")
    # Another attempt of the same job, which the store will not let end it.
    stale = type(winner)(winner.id, winner.attempt + 1, b"x", "a.png", {})
    videos = {claim.attempt: tmp_path / f"attempt-{claim.attempt}.mp4" for claim in (winner, stale)}
    for attempt, path in videos.items():
        path.write_bytes(f"the video of attempt {attempt}".encode())

    outputs.put(job.id, videos[winner.attempt], _record(1), winner.attempt)
    assert store.finish(winner, COMPLETED)
    assert not keep_video(outputs, stale, videos[stale.attempt], _record(2), lambda: False)
    assert outputs.find(job.id) is None, "not promoted yet: the worker stopped after the store's finish"
    download, record = outputs.find_job(job.id, store.get(job.id).attempt)
    assert b"".join(download.chunks) == f"the video of attempt {winner.attempt}".encode()
    assert sorted(entry.name for entry in outputs.storage.list()) == [f"{job.id}.json", f"{job.id}.mp4"]
