"""Many replicas, one queue: two `bentoml serve` replicas of the tiny model, each with its own
BENTOML_HOME, sharing one real Redis (SVD_QUEUE_URL) and one S3 bucket (SVD_OUTPUT_DIR=s3://...,
moto's server) and no folder, as the pods of deploy/ and BentoCloud's replicas share them; a
shared folder is the same Outputs on the folder backend, which every other test runs. Jobs
submitted anywhere run on both; either answers for any job; a replica killed mid-job loses
nothing; Redis stopped and started again loses nothing.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from harness import (
    PHOTO,
    S3,
    SMALL,
    Redis,
    Server,
    _ready,
    decode_video,
    job_status,
    job_video,
    metric,
    redis_server,
    require_redis_server,
    s3_server,
    serve,
    submit_job,
    wait_until,
)
from svd.jobs.model import COMPLETED, IN_PROGRESS
from svd.tools.client import follow

require_redis_server()

# Long enough in denoising (seconds on two cores) to act while it runs.
SLOW = {**SMALL, "num_inference_steps": 40}
# A dead replica's job is taken by the other this many seconds after its last renewal.
LEASE = "3"


@dataclass
class Cluster:
    redis: Redis
    replicas: list[Server]
    s3: S3
    bucket: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("replicas")
    with ExitStack() as stack:
        redis = stack.enter_context(redis_server(root / "redis"))
        s3 = stack.enter_context(s3_server())
        bucket = s3.bucket("replicas")
        env = {"SVD_QUEUE_URL": redis.url, "SVD_OUTPUT_DIR": f"{bucket}/outputs", "SVD_JOB_LEASE": LEASE, **s3.env}
        # Started together, then waited for: the two load their models at once.
        replicas = [stack.enter_context(serve(root / name, env, wait_ready=False)) for name in ("a", "b")]
        for replica in replicas:
            wait_until(lambda: _ready(replica.url, replica.process, replica.log), 180, 0.5, "replica ready")
        yield Cluster(redis, replicas, s3, "replicas")


def _ran_on(cluster: Cluster, task_id: str) -> list[int]:
    """Which replicas' logs say they started the job, by index."""
    return [
        index for index, replica in enumerate(cluster.replicas) if f"SVD job {task_id} started" in replica.log_text()
    ]


def test_jobs_submitted_to_one_replica_run_on_both_and_either_answers_for_any(cluster: Cluster, tmp_path: Path):
    a, b = cluster.replicas
    # Two jobs long enough to watch, two short ones waiting behind them.
    jobs = [submit_job(a, seed=str(seed), **(SLOW if seed < 2 else {})) for seed in range(4)]
    # Both GPUs take work at once, and the jobs waiting are counted on every replica.
    wait_until(lambda: all(_ran_on(cluster, job) for job in jobs[:2]), 30, 0.1, "two jobs started")
    assert {index for job in jobs[:2] for index in _ran_on(cluster, job)} == {0, 1}
    assert metric(a, "svd_jobs_running") == metric(b, "svd_jobs_running") == 2
    assert metric(a, "svd_jobs_waiting") == metric(b, "svd_jobs_waiting") == 2
    assert metric(b, "svd_jobs_oldest_waiting_seconds") > 0
    # Progress and status from the replica the job was not submitted to, whichever runs it.
    progress = wait_until(
        lambda: (
            (p := httpx.post(f"{b.url}/progress", json={"task_id": jobs[0]}, timeout=30).json())["stage"] == "denoise"
            and p
        ),
        60,
        0.1,
        "progress seen from the other replica",
    )
    assert progress["status"] == IN_PROGRESS and progress["steps"] == SLOW["num_inference_steps"]
    # Its live preview, from the bucket, through either replica.
    preview = wait_until(
        lambda: httpx.post(f"{b.url}/progress", json={"task_id": jobs[0]}, timeout=30).json()["preview"],
        60,
        0.1,
        "a preview",
    )
    for replica in (a, b):
        image = httpx.get(f"{replica.url}{preview}", timeout=30)
        assert image.status_code == 200 and image.headers["content-type"] == "image/webp", image.text
    # Its event stream from the replica that is not running it: every step from there on, in order, then the end.
    (runner,) = _ran_on(cluster, jobs[0])
    seen = list(follow(cluster.replicas[1 - runner].url, jobs[0], timeout=120))
    steps = [event["step"] for event in seen if event["stage"] == "denoise" and event["status"] == IN_PROGRESS]
    # A step may come twice: a new preview within it is a change a user sees too.
    assert steps and steps == sorted(steps), seen
    assert sorted(set(steps)) == list(range(steps[0], SLOW["num_inference_steps"] + 1)), seen
    assert seen[-1]["status"] == COMPLETED and seen[-1]["output_path"] == f"/generate_task/get?task_id={jobs[0]}"
    for job in jobs:
        wait_until(lambda: job_status(b, job)["status"] == COMPLETED, 120, 0.2, "job completed")
        assert job_status(a, job)["status"] == COMPLETED
    assert all(len(_ran_on(cluster, job)) == 1 for job in jobs), "each job ran once"
    assert {index for job in jobs for index in _ran_on(cluster, job)} == {0, 1}, "both replicas ran jobs"
    # Every video from either replica, and from the bucket through /outputs/, byte for byte as kept there.
    stored = cluster.s3.objects(cluster.bucket)
    for index, job in enumerate(jobs):
        job_video(cluster.replicas[index % 2], job, tmp_path / f"{job}.mp4")
        kept = httpx.get(f"{cluster.replicas[(index + 1) % 2].url}/outputs/{job}", timeout=30)
        assert kept.status_code == 200 and kept.content == (tmp_path / f"{job}.mp4").read_bytes()
        assert kept.content == stored[f"outputs/{job}.mp4"]
    assert not any((replica.tmp.parent / "outputs").exists() for replica in cluster.replicas), "no folder used"
    log = a.log_text() + b.log_text()
    assert "SVD keeps videos in s3://replicas/outputs/" in log
    assert cluster.s3.secret not in log and cluster.s3.env["AWS_ACCESS_KEY_ID"] not in log, "no credentials logged"
    assert metric(a, "svd_jobs_waiting") == metric(a, "svd_jobs_running") == 0
    cancel = httpx.put(f"{b.url}/generate_task/cancel", params={"task_id": jobs[0]}, timeout=30)
    assert cancel.status_code == 409, "a job one replica finished is finished for the other"


def test_redis_stopped_refuses_jobs_keeps_generating_and_loses_nothing(cluster: Cluster, tmp_path: Path):
    a, b = cluster.replicas
    running = [submit_job(a, seed=str(seed), **SLOW) for seed in range(2)]
    waiting = submit_job(b, seed="9")
    wait_until(lambda: all(job_status(a, job)["status"] == IN_PROGRESS for job in running), 30, 0.1, "both running")
    cluster.redis.stop()

    refused = httpx.post(
        f"{a.url}/generate_task/submit",
        files={"image": ("r.jpg", PHOTO.read_bytes(), "image/jpeg")},
        data=SMALL,
        timeout=60,
    )
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5"
    assert f"Redis at 127.0.0.1:{cluster.redis.port}/0, is unreachable" in refused.json()["error"]
    assert httpx.get(f"{b.url}/generate_task/status", params={"task_id": waiting}, timeout=30).status_code == 503
    assert httpx.post(f"{b.url}/progress", json={"task_id": waiting}, timeout=30).status_code == 503
    wait_until(lambda: httpx.get(f"{a.url}/readyz", timeout=30).status_code == 503, 60, 0.2, "/readyz 503")
    # Generating without the queue still works, on the GPU the running job lets go of.
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{a.url}/generate", files=files, data=SMALL, timeout=300)
    assert response.status_code == 200, response.text
    (tmp_path / "sync.mp4").write_bytes(response.content)
    assert len(decode_video(tmp_path / "sync.mp4").frames) == SMALL["num_frames"]

    cluster.redis.start()
    wait_until(
        lambda: all(httpx.get(f"{r.url}/readyz", timeout=30).status_code == 200 for r in (a, b)), 30, 0.2, "ready"
    )
    for job in [*running, waiting]:
        wait_until(lambda: job_status(a, job)["status"] == COMPLETED, 120, 0.2, "job completed after Redis came back")
    # The jobs that ran through the outage ended on their first attempt: their videos were kept.
    assert [job_status(b, job)["attempt"] for job in running] == [1, 1]
    for job in [*running, waiting]:
        job_video(b, job, tmp_path / f"{job}.mp4")
    log = a.log_text() + b.log_text()
    assert "SVD cannot reach the job store" in log and "SVD reaches the job store again" in log
    assert "Traceback" not in log


def test_a_replica_killed_mid_job_leaves_its_job_to_the_other(cluster: Cluster, tmp_path: Path):
    a, b = cluster.replicas
    job = submit_job(a, **SLOW)
    behind = submit_job(a, seed="5")
    wait_until(lambda: _ran_on(cluster, job), 30, 0.1, "the job started")
    wait_until(
        lambda: httpx.post(f"{a.url}/progress", json={"task_id": job}, timeout=30).json()["step"] >= 2,
        60,
        0.1,
        "denoising",
    )
    (holder,) = _ran_on(cluster, job)
    dead, alive = cluster.replicas[holder], cluster.replicas[1 - holder]
    os.killpg(dead.process.pid, signal.SIGKILL)
    dead.process.wait(10)
    wait_until(lambda: not dead.workers(), 10, 0.1, "the dead replica's workers gone")

    wait_until(
        lambda: job_status(alive, job)["status"] == COMPLETED, 120, 0.2, "the job completed on the other replica"
    )
    assert job_status(alive, job)["attempt"] == 2
    assert (
        f"SVD job {job} started on worker 1, attempt 2, retried after its worker stopped 1 time(s)" in alive.log_text()
    )
    wait_until(lambda: job_status(alive, behind)["status"] == COMPLETED, 120, 0.2, "the job behind completed")
    job_video(alive, job, tmp_path / "retried.mp4")
