"""Split roles (SVD_ROLE), as deploy/ runs them: api replicas without a GPU take every request,
GPU workers started by the queue (KEDA, from zero) run the jobs. One real Redis, one outputs
folder, the tiny model: a job waits with no worker while the api stays ready, a worker started
later runs it, a worker killed mid-job leaves it to the next one, and the tutorial's curl
through the api gets its video.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import redis

from harness import (
    PHOTO,
    ROOT,
    SMALL,
    Server,
    assert_browser_safe_mp4,
    decode_video,
    job_status,
    job_video,
    metric,
    redis_server,
    require_redis_server,
    serve,
    submit_job,
    wait_until,
)
from svd.jobs.model import COMPLETED, FAILED, IN_PROGRESS, PENDING
from svd.jobs.redis import STREAM, RedisJobs

require_redis_server()

# Long enough in denoising (seconds on two cores) to kill its worker while it runs.
SLOW = {**SMALL, "num_inference_steps": 40}
# An api replica is BentoML and the web stack: no torch, no model. Its two processes measured
# 179 MiB on this machine, where `all` with the tiny model took 558 MiB (python -m bench --sections roles).
API_RSS_BOUND = 400 * 2**20


@pytest.mark.parametrize("role", ["api", "worker"])
def test_a_split_role_refuses_to_start_without_the_queue_and_the_shared_videos(role: str):
    env = {**os.environ, "SVD_ROLE": role, "SVD_MODEL_ID": "tiny"}
    env.pop("SVD_QUEUE_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", "import service"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert f"SVD cannot start: SVD_ROLE={role} splits the service in two" in result.stderr
    assert "Set SVD_QUEUE_URL" in result.stderr and "Traceback" not in result.stderr


def test_the_stream_keda_reads_holds_exactly_the_jobs_waiting_or_running(tmp_path: Path):
    """deploy/scaling/keda.yaml scales the workers on the stream's length (XLEN), one per job: it must
    count a job from its submit until it ends, however it ends, and nothing else."""
    with redis_server(tmp_path / "redis") as queue:
        store, stream = RedisJobs(queue.url, lease=30), redis.Redis.from_url(queue.url)

        def scaler_sees() -> int:
            depth = store.depth()
            assert stream.xlen(STREAM) == depth.waiting + depth.running
            return stream.xlen(STREAM)

        jobs = [store.submit(PHOTO.read_bytes(), "rocket.jpg", {}, per_worker=4).id for _ in range(4)]
        assert scaler_sees() == 4
        completed, failed = store.claim("worker-a"), store.claim("worker-b")
        assert scaler_sees() == 4, "running jobs keep their workers"
        store.cancel(jobs[3])  # waiting: no worker has read it yet
        assert scaler_sees() == 3
        store.finish(completed, COMPLETED)
        store.finish(failed, FAILED, "out of memory", 507)
        assert scaler_sees() == 1
        running = store.claim("worker-a")
        store.cancel(running.id)
        assert scaler_sees() == 0 and store.claim("worker-a") is None


def _loads_torch(server: Server) -> bool:
    """Whether any process of the server has torch's library mapped."""
    for pid in [server.process.pid, *server.workers()]:
        try:
            if "libtorch" in Path(f"/proc/{pid}/maps").read_text():
                return True
        except OSError:
            continue  # ended meanwhile
    return False


def _generate_request(url: str) -> bytes:
    """The bytes of a POST /generate of the rocket photo at SMALL, as curl -F sends them."""
    request = httpx.Request("POST", f"{url}/generate", files={"image": ("rocket.jpg", PHOTO.read_bytes())}, data=SMALL)
    body = request.read()
    head = f"POST /generate HTTP/1.1\r\nHost: {urlsplit(url).netloc}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in request.headers.items() if name.lower() != "host"
    )
    return head.encode() + b"\r\n" + body


def test_api_replicas_queue_everything_and_workers_started_later_run_it(tmp_path: Path):
    shared = tmp_path / "shared-outputs"
    with redis_server(tmp_path / "redis") as queue:
        env = {"SVD_QUEUE_URL": queue.url, "SVD_OUTPUT_DIR": str(shared), "SVD_JOB_LEASE": "3"}
        with serve(tmp_path / "api", {**env, "SVD_ROLE": "api"}) as api:
            # Ready with no GPU worker anywhere, and without torch.
            assert not _loads_torch(api), "the api replica imported torch"
            assert api.worker_rss() < API_RSS_BOUND, f"{api.worker_rss() / 2**20:.0f} MiB"
            stream = redis.Redis.from_url(queue.url)

            job = submit_job(api, **SLOW)
            assert job_status(api, job)["status"] == PENDING
            assert httpx.get(f"{api.url}/readyz", timeout=30).status_code == 200
            # The stream the worker autoscaler reads holds each job waiting or running, and only those.
            assert stream.xlen(STREAM) == 1

            # A synchronous request whose client goes away takes its job with it.
            with socket.create_connection((urlsplit(api.url).hostname, urlsplit(api.url).port)) as client:
                client.sendall(_generate_request(api.url))
                wait_until(lambda: metric(api, "svd_jobs_waiting") == 2, 30, 0.1, "the request queued as a job")
            wait_until(lambda: metric(api, "svd_jobs_waiting") == 1, 30, 0.1, "its job canceled")
            assert "canceled: its synchronous request ended before the job" in api.log_text()
            assert stream.xlen(STREAM) == 1, "a canceled job would wake a GPU worker"

            # The tutorial's curl waits for a worker.
            out = tmp_path / "curl.mp4"
            fields = " ".join(f"-F '{key}={value}'" for key, value in SMALL.items())
            curl = subprocess.Popen(
                f"curl -sS -X POST '{api.url}/generate' -F 'image=@{PHOTO};type=image/jpeg' {fields} "
                f"-o {out} -w '%{{http_code}}'",
                shell=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            wait_until(lambda: metric(api, "svd_jobs_waiting") == 2, 30, 0.1, "curl's request queued")
            assert httpx.get(f"{api.url}/readyz", timeout=30).status_code == 200

            with serve(tmp_path / "worker-a", {**env, "SVD_ROLE": "worker"}) as first:
                # A worker answers its probes and metrics, not the public API.
                assert httpx.get(f"{first.url}/metrics", timeout=30).status_code == 200
                refused = httpx.post(f"{first.url}/generate_task/submit", timeout=30)
                assert refused.status_code == 404 and "SVD_ROLE=worker" in refused.json()["error"]
                assert httpx.get(f"{first.url}/ui/", timeout=30).status_code == 404
                wait_until(
                    lambda: httpx.post(f"{api.url}/progress", json={"task_id": job}, timeout=30).json()["step"] >= 2,
                    120,
                    0.1,
                    "the job denoising on the first worker",
                )
                assert job_status(api, job)["status"] == IN_PROGRESS
                os.killpg(first.process.pid, signal.SIGKILL)
                first.process.wait(10)
                wait_until(lambda: not first.workers(), 10, 0.1, "the killed worker's processes gone")

            with serve(tmp_path / "worker-b", {**env, "SVD_ROLE": "worker"}) as second:
                wait_until(lambda: job_status(api, job)["status"] == COMPLETED, 180, 0.2, "the job done by the next")
                assert job_status(api, job)["attempt"] == 2
                assert f"SVD job {job} started on worker 1, attempt 2" in second.log_text()
                job_video(api, job, tmp_path / "job.mp4")
                assert curl.communicate(timeout=180)[0] == "200"
                assert_browser_safe_mp4(decode_video(out), SMALL["width"], SMALL["height"], SMALL["num_frames"])
                # Nothing left for the autoscaler: the workers may go back to zero.
                wait_until(lambda: stream.xlen(STREAM) == 0, 30, 0.1, "the stream empty")
            assert re.search(r"Traceback", api.log_text()) is None
