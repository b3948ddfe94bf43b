"""SVD_WORKERS: several workers, each with its own model, behind one port (tiny model, CPU)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from harness import PHOTO, SMALL, Server, decode_video, serve, wait_until
from svd.base.settings import ConfigError, Settings

REQUEST = {**SMALL, "num_frames": 4}


def _post(server: Server, route: str = "/generate", **data) -> httpx.Response:
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    # A connection per request: the kernel hands each new one to either worker.
    return httpx.post(f"{server.url}{route}", files=files, data={**REQUEST, **data}, timeout=300)


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    with serve(tmp_path_factory.mktemp("workers"), env={"SVD_WORKERS": "2"}) as running:
        # /readyz answers for whichever worker takes it: wait for both to say so in the log.
        wait_until(lambda: "worker 2 of 2" in running.log_text() and "worker 1 of 2" in running.log_text(), 180)
        yield running


def test_both_workers_load_the_model_and_serve_requests(two_workers: Server, tmp_path: Path):
    log = two_workers.log_text()
    assert "SVD ready: worker 1 of 2" in log and "SVD ready: worker 2 of 2" in log
    answered: set[str] = set()

    def both_answered() -> bool:
        with ThreadPoolExecutor(2) as pool:
            for response in pool.map(lambda _: _post(two_workers), range(2)):
                assert response.status_code == 200, response.text
                answered.add(response.headers["x-worker"])
                (tmp_path / "video.mp4").write_bytes(response.content)
                assert len(decode_video(tmp_path / "video.mp4").frames) == 4
        return answered == {"1", "2"}

    wait_until(both_answered, 240, 0, "a video from each worker")


def test_a_job_is_followed_and_fetched_whichever_worker_answers(two_workers: Server, tmp_path: Path):
    submitted = _post(two_workers, "/generate_task/submit", seed="5", num_inference_steps="6")
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]
    stages: list[str] = []
    answered: dict[str, set[str]] = {"progress": set(), "get": set()}

    def finished() -> bool:
        # Fresh connections, so the calls spread over both workers.
        progress = httpx.post(f"{two_workers.url}/progress", json={"task_id": task_id}, timeout=30)
        stages.append(progress.json()["stage"])
        answered["progress"].add(progress.headers["x-served-by"])
        status = httpx.get(f"{two_workers.url}/generate_task/status", params={"task_id": task_id}, timeout=30)
        return status.json()["status"] not in ("pending", "in_progress")

    wait_until(finished, 240, 0.1, "the job finished")
    # Every worker knows the job from the moment it is submitted.
    assert "denoise" in stages and "unknown" not in stages, stages

    def both_answered() -> bool:
        progress = httpx.post(f"{two_workers.url}/progress", json={"task_id": task_id}, timeout=30)
        assert progress.json()["stage"] == "done" and progress.json()["segments"] == 1, progress.text
        answered["progress"].add(progress.headers["x-served-by"])
        result = httpx.get(f"{two_workers.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
        assert result.status_code == 200 and result.headers["x-seed"] == "5"
        answered["get"].add(result.headers["x-served-by"])
        (tmp_path / "job.mp4").write_bytes(result.content)
        assert len(decode_video(tmp_path / "job.mp4").frames) == 4
        assert json.loads(result.headers["x-settings"])["num_inference_steps"] == 6
        return answered == {"progress": {"1", "2"}, "get": {"1", "2"}}

    wait_until(both_answered, 120, 0, "both workers answered progress and get")


def test_workers_gpus_counts_the_visible_gpus(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVD_WORKERS", "gpus")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    assert Settings.from_env().workers == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(ConfigError, match="no GPU is visible"):
        Settings.from_env()
    monkeypatch.setenv("SVD_WORKERS", "0")
    with pytest.raises(ConfigError, match="SVD_WORKERS"):
        Settings.from_env()


def test_each_worker_takes_its_own_gpu(monkeypatch: pytest.MonkeyPatch):
    """BentoML shows every worker all the GPUs (CUDA_VISIBLE_DEVICES=0,1): worker N takes cuda:N-1."""
    import torch

    from svd.core.loading import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    devices = [resolve_device(Settings(model_id="tiny", workers=2, worker=worker)) for worker in (1, 2)]
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
