"""A real server's life: refusing to start without a GPU, readiness after warm-up, graceful stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

from harness import PHOTO, ROOT, serve, wait_until


def status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=30).status_code
    except httpx.HTTPError:
        return None


def test_a_real_model_without_a_gpu_refuses_to_start_with_one_clear_paragraph(tmp_path: Path):
    env = {
        **os.environ,
        "SVD_MODEL_ID": "",
        "SVD_DEVICE": "",
        "CUDA_VISIBLE_DEVICES": "",  # a machine without a GPU, also where there is one
        "BENTOML_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:StableDiffusionVideo", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "No CUDA GPU found, so stabilityai/stable-video-diffusion-img2vid-xt will not be loaded" in output
    assert "SVD_MODEL_ID=tiny" in output and "SVD_DEVICE=cpu" in output
    assert "Traceback" not in output


def test_a_bad_setting_or_a_model_that_cannot_be_found_refuses_in_one_paragraph(tmp_path: Path):
    cases = {
        "SVD_DTYPE=float8": ({"SVD_MODEL_ID": "tiny", "SVD_DTYPE": "float8"}, "SVD_DTYPE='float8' is not allowed"),
        "no such model": (
            {"SVD_MODEL_ID": "nobody-here/no-such-model", "SVD_DEVICE": "cpu"},
            "nobody-here/no-such-model",
        ),
    }
    for name, (settings, message) in cases.items():
        env = {**os.environ, "BENTOML_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", **settings}
        result = subprocess.run(
            [sys.executable, "-m", "bentoml", "serve", "service:StableDiffusionVideo", "--port", "0"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
        )
        output = result.stdout + result.stderr
        assert result.returncode != 0, name
        assert "SVD cannot start: " in output and message in output, output[-2000:]
        assert "Traceback" not in output, output[-3000:]


def test_readyz_turns_200_only_after_warm_up_while_livez_answers_throughout(tmp_path: Path):
    with serve(tmp_path, wait_ready=False) as server:
        seen: list[tuple[int | None, int | None]] = []

        def probe() -> bool:
            seen.append((status(f"{server.url}/livez"), status(f"{server.url}/readyz")))
            assert server.process.poll() is None, server.log_text()[-3000:]
            return seen[-1] == (200, 200)

        wait_until(probe, 180, 0.02, "readyz 200")
        assert (200, 503) in seen, f"never saw live-but-not-ready: {sorted(set(seen), key=str)}"
        log = server.log_text()
        assert (
            "SVD ready: worker 1 of 1, model tiny (built in code, random weights), device cpu, dtype float32, "
            "memory full"
            in log
        )
        assert "loaded in" in log and "warmed up in" in log


def test_while_the_model_loads_a_request_gets_503_with_retry_after(monkeypatch):
    """In-process, with loading held until the refusal is seen: no race with a fast tiny model."""
    from svd.base.errors import Refused
    from svd.base.params import GenerationParams
    from svd.base.settings import Settings
    from svd.http.answers import answer
    from svd.serving import engine as module

    release = threading.Event()
    real_load = module.load_pipeline
    monkeypatch.setattr(module, "load_pipeline", lambda *args: (release.wait(60), real_load(*args))[1])
    engine = module.Engine(Settings(model_id="tiny", device="cpu"))
    params = GenerationParams(width=64, height=64, num_frames=2, num_inference_steps=1)
    try:
        engine.run(PHOTO, params, Path(tempfile.mkdtemp()))
    except Refused as refused:
        response = answer(refused)
    finally:
        release.set()
    assert response.status_code == 503 and response.headers["retry-after"] == "10"
    assert b"the model is still loading; retry when /readyz answers 200" in response.body
    assert engine.wait_ready(120) and engine.run(PHOTO, params, Path(tempfile.mkdtemp())).path.is_file()


def test_sigterm_finishes_the_request_in_flight_then_exits(tmp_path: Path):
    with serve(tmp_path) as server:
        answers: list[httpx.Response] = []
        # Many steps, so that the request is still in flight when the signal comes (checked below).
        data = {"width": 256, "height": 128, "num_frames": 8, "num_inference_steps": 100}

        def request() -> None:
            files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
            answers.append(httpx.post(f"{server.url}/generate", files=files, data=data, timeout=300))

        client = threading.Thread(target=request)
        client.start()
        wait_until(lambda: _generating(server.url), 120, 0.05, "a generation in flight")
        os.killpg(server.process.pid, signal.SIGTERM)
        assert not answers, "the request was in flight when the signal came"
        # Connections opened after the signal are held unanswered, then closed as the worker ends.
        wait_until(lambda: _refused(f"{server.url}/livez"), 300, 0.1, "new connections closed unanswered")
        client.join(300)
        assert answers and answers[0].status_code == 200, answers and answers[0].text
        assert answers[0].headers["content-type"] == "video/mp4"
        server.process.wait(120)


def test_probes_and_job_routes_answer_while_generating(server):
    """The probes and the job routes never wait on a generation: each round of them is answered
    between two reports of one running job, while a synchronous request runs too."""
    from harness import SMALL

    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    job = httpx.post(
        f"{server.url}/generate_task/submit", files=files, data={**SMALL, "num_inference_steps": 100}, timeout=60
    )
    task_id = job.json()["task_id"]
    synchronous = threading.Thread(
        target=lambda: httpx.post(
            f"{server.url}/generate", files=files, data={**SMALL, "num_inference_steps": 6}, timeout=300
        )
    )
    synchronous.start()

    def progress() -> dict:
        return httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=30).json()

    # Rounds answered while the job was denoising, seen as steps reported before and after them.
    during: list[tuple[int, int]] = []

    def probe_all() -> bool:
        before = progress()
        for method, path, body in (
            ("GET", "/livez", None), ("GET", "/readyz", None), ("GET", "/metrics", None),
            ("GET", f"/generate_task/status?task_id={task_id}", None), ("POST", "/progress", {"task_id": task_id}),
        ):
            httpx.request(method, f"{server.url}{path}", json=body, timeout=30).raise_for_status()
        after = progress()
        if before["stage"] == after["stage"] == "denoise" and after["step"] < after["steps"]:
            during.append((before["step"], after["step"]))
        return not synchronous.is_alive() and after["status"] == "completed"

    wait_until(probe_all, 300, 0.05, "both generations finished")
    assert len(during) >= 3, during
    assert during[-1][1] > during[0][0], "the job went on meanwhile"


def _refused(url: str) -> bool:
    """The connection is refused, or closed unanswered: a slow answer is not a refusal (its timeout
    raises, and wait_until asks again)."""
    try:
        httpx.get(url, timeout=30)
    except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
        return True
    return False


def _generating(url: str) -> bool:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return any(line.startswith("svd_in_flight ") and float(line.split()[1]) >= 1 for line in text.splitlines())


def test_a_cuda_error_that_poisons_the_context_turns_livez_503_so_the_worker_is_restarted(tmp_path: Path):
    """An illegal memory access leaves the CUDA context unusable: only a restart recovers."""
    with serve(tmp_path, env={"SVD_TEST_FAULTS": "decode:1:device_error"}) as server:
        files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
        data = {"width": 64, "height": 64, "num_frames": 2, "num_inference_steps": 1}
        failed = httpx.post(f"{server.url}/generate", files=files, data=data, timeout=120)
        assert failed.status_code == 503, failed.text
        assert "the GPU failed and this worker must be restarted" in failed.json()["error"]
        assert "illegal memory access" in failed.json()["error"]
        assert (status(f"{server.url}/livez"), status(f"{server.url}/readyz")) == (503, 503)
        refused = httpx.post(f"{server.url}/generate", files=files, data=data, timeout=120)
        assert refused.status_code == 503 and "must be restarted" in refused.json()["error"]
        assert "/livez now answers 503" in server.log_text()
