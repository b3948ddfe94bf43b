"""A real `bentoml serve` of the tiny model, called the ways the README shows."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import bentoml
import httpx
import numpy as np
import pytest

from harness import PHOTO, SMALL, assert_browser_safe_mp4, decode_video

TUTORIAL_CURL = (
    "curl -X 'POST' '{url}/generate' -H 'accept: video/*' -H 'Content-Type: multipart/form-data' "
    "-F 'image=@assets/rocket.jpg;type=image/png' -o {out} -F 'decode_chunk_size=2' -F 'seed=null'"
)


def curl(command: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, shell=True, cwd=Path(__file__).parent.parent, capture_output=True, timeout=600)


def test_tutorial_curl_at_the_full_default_size(server, tmp_path):
    """The tutorial's curl as it stands: 25 frames of 1024x576 with 25 steps (minutes on CPU)."""
    out = tmp_path / "generated.mp4"
    result = curl(TUTORIAL_CURL.format(url=server.url, out=out) + f" -D {tmp_path / 'headers'}")
    assert result.returncode == 0, result.stderr
    headers = (tmp_path / "headers").read_text().lower()
    assert " 200 " in headers.splitlines()[0]
    assert "x-seed: " in headers and "content-type: video/mp4" in headers
    assert_browser_safe_mp4(decode_video(out), 1024, 576, 25)


def test_curl_small_with_seed_null(server, tmp_path):
    out = tmp_path / "small.mp4"
    small = " ".join(f"-F '{key}={value}'" for key, value in SMALL.items())
    result = curl(TUTORIAL_CURL.format(url=server.url, out=out) + " " + small)
    assert result.returncode == 0, result.stderr
    assert_browser_safe_mp4(decode_video(out), 256, 128, 8)


def test_python_client_returns_a_path_and_seeds_reproduce(server, tmp_path):
    with bentoml.SyncHTTPClient(server.url, timeout=600) as client:
        first = client.generate(image=PHOTO, decode_chunk_size=2, seed=42, **SMALL)
        assert isinstance(first, Path)
        kept = shutil.copy(first, tmp_path / "first.mp4")
        again = client.generate(image=PHOTO, decode_chunk_size=2, seed=42, **SMALL)
        unseeded = client.generate(image=PHOTO, **SMALL)
    video = decode_video(Path(kept))
    assert_browser_safe_mp4(video, 256, 128, 8)
    assert np.array_equal(video.frames, decode_video(again).frames)
    assert decode_video(unseeded).frames.shape == video.frames.shape


def test_x_seed_replays_the_same_frames(server, tmp_path):
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    with httpx.Client(base_url=server.url, timeout=600) as http:
        first = http.post("/generate", files=files, data=SMALL)
        seed = first.headers["x-seed"]
        replay = http.post("/generate", files=files, data={**SMALL, "seed": seed})
    assert first.status_code == replay.status_code == 200
    assert replay.headers["x-seed"] == seed
    (tmp_path / "a.mp4").write_bytes(first.content)
    (tmp_path / "b.mp4").write_bytes(replay.content)
    assert np.array_equal(decode_video(tmp_path / "a.mp4").frames, decode_video(tmp_path / "b.mp4").frames)
    assert "denoise;dur=" in first.headers["server-timing"]


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("width", "1000", "a multiple of 64 from 64 to 1024"),
        ("width", "2048", "a multiple of 64 from 64 to 1024"),
        ("height", "32", "a multiple of 64 from 64 to 1024"),
        ("num_frames", "26", "from 1 to 25"),
        ("num_inference_steps", "0", "from 1 to 100"),
        ("num_inference_steps", "101", "from 1 to 100"),
        ("cache_interval", "0", "from 1 to 5"),
        ("cache_interval", "6", "from 1 to 5"),
        ("cache_interval", "2.5", "from 1 to 5"),
        ("decode_chunk_size", "0", "from 1 to 64"),
        ("seed", "-1", "from 0 to 4294967295"),
        ("seed", "abc", "valid integer from 0 to 4294967295"),
        ("fps", "0", "from 1 to 60"),
        ("fps", "61", "from 1 to 60"),
        ("motion_bucket_id", "256", "from 0 to 255"),
        ("noise_aug_strength", "1.5", "from 0 to 1"),
        ("noise_aug_strength", "nan", "from 0 to 1"),
        ("min_guidance_scale", "-1", "from 0 to 20"),
        ("max_guidance_scale", "inf", "from 0 to 20"),
        ("max_guidance_scale", "1e309", "from 0 to 20"),
        ("sizing", "zoom", "'stretch', 'crop' or 'pad'"),
        ("format", "avi", "'mp4', 'webm' or 'gif'"),
        ("interpolate", "3", "1, 2 or 4"),
        ("segments", "5", "from 1 to 4"),
        ("segments", "0", "from 1 to 4"),
        ("loop", "bounce", "'none' or 'pingpong'"),
    ],
)
def test_out_of_range_fields_get_400_naming_field_and_range(server, field, value, allowed):
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{server.url}/generate", files=files, data={**SMALL, field: value}, timeout=60)
    assert response.status_code == 400, response.text
    assert field in response.text and allowed in response.text


@pytest.mark.parametrize("route", ["/generate", "/generate_task/submit"])
def test_a_misspelt_field_gets_400_naming_it_and_the_accepted_ones(server, route: str):
    """Silently ignored, it would cost minutes of GPU for a video made with the defaults."""
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{server.url}{route}", files=files, data={**SMALL, "motion_bucket": "3"}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error.startswith("unknown field `motion_bucket`;")
    assert f"{route} accepts: image, decode_chunk_size, seed, width" in error and "motion_bucket_id" in error


def test_unknown_fields_are_refused_in_urlencoded_and_json_bodies_too(server):
    form = httpx.post(f"{server.url}/generate", data={"num_frame": "14", "sede": "1"}, timeout=30)
    assert form.status_code == 400 and "unknown fields `num_frame`, `sede`;" in form.json()["error"]
    as_json = httpx.post(f"{server.url}/progress", json={"task": "abc"}, timeout=30)
    assert as_json.status_code == 400 and "unknown field `task`; /progress accepts: task_id." in as_json.json()["error"]
    known = httpx.post(f"{server.url}/progress", json={"task_id": "0" * 32}, timeout=30)
    assert known.status_code == 404 and "no task 000" in known.json()["error"]


def test_swagger_lists_generate_with_every_parameter_described(server):
    spec = httpx.get(f"{server.url}/docs.json", timeout=60).json()
    operation = spec["paths"]["/generate"]["post"]
    schema = operation["requestBody"]["content"]["multipart/form-data"]["schema"]
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    properties = schema["properties"]
    expected = {"image", "decode_chunk_size", "seed", "width", "height", "num_frames", "num_inference_steps"}
    assert expected <= set(properties)
    undescribed = [name for name, prop in properties.items() if not prop.get("description")]
    assert undescribed == []
    assert properties["width"]["default"] == 1024 and properties["decode_chunk_size"]["default"] == 2
    assert httpx.get(f"{server.url}/", timeout=60).status_code == 200


def test_jobs_through_the_python_client_run_one_at_a_time(server, tmp_path):
    """Three jobs and a synchronous request at once: the GPU runs one generation at a time.

    Proved from what the service records, on the machine's one clock, not from the test's timing:
    a job holds the GPU from its claim (`executed_at`, taken with the GPU's turn) through its
    prepare, encode, denoise and decode (Server-Timing); the synchronous request's GPU stages lie
    between its sending and its answer, less the interpolation and encoding that follow them.
    """
    import threading
    import time
    from datetime import datetime

    from harness import wait_until
    from svd.tools.client import SyncHTTPClient

    def stages(response: httpx.Response) -> dict[str, float]:
        timing = response.headers["server-timing"].split(", ")
        return {stage: float(ms) / 1000 for stage, ms in (part.split(";dur=") for part in timing)}

    # Rounding of Server-Timing (0.1 ms) and of the stored times (1 us), not a margin for speed.
    rounding = 0.002
    # Long enough that the synchronous request is sent while the first job is on the GPU.
    params = {**SMALL, "num_inference_steps": 10}
    with SyncHTTPClient(server.url, timeout=600) as client:
        tasks = [client.generate_task.submit(image=PHOTO, seed=seed, **params) for seed in (1, 2, 3)]
        wait_until(
            lambda: any(client.progress(task_id=task.id)["stage"] == "denoise" for task in tasks),
            120,
            0.02,
            "a job denoising",
        )
        synchronous: list[tuple[float, httpx.Response, float]] = []

        def generate() -> None:
            files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
            sent = time.time()
            response = httpx.post(f"{server.url}/generate", files=files, data={**SMALL, "seed": 4}, timeout=600)
            synchronous.append((sent, response, time.time()))

        sync = threading.Thread(target=generate)
        sync.start()
        wait_until(
            lambda: all(task.get_status().value not in ("pending", "in_progress") for task in tasks),
            300,
            0.2,
            "jobs finished",
        )
        sync.join(300)
        on_gpu = []
        for task in tasks:
            assert task.get_status().value == "completed"
            video = decode_video(task.get())
            assert len(video.frames) == 8 and video.codec == "h264"
            got = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task.id}, timeout=60)
            took = stages(got)
            status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task.id}, timeout=60).json()
            claimed = datetime.fromisoformat(status["executed_at"]).timestamp()
            on_gpu.append((claimed, claimed + took["prepare"] + took["encode"] + took["denoise"] + took["decode"]))
        assert client.progress(task_id=tasks[0].id)["stage"] == "done"

    (sent, response, answered), = synchronous
    assert response.status_code == 200, response.text
    (tmp_path / "sync.mp4").write_bytes(response.content)
    assert len(decode_video(tmp_path / "sync.mp4").frames) == 8, "the synchronous request was served"
    on_gpu.sort()
    assert all(later[0] >= earlier[1] - rounding for earlier, later in zip(on_gpu, on_gpu[1:])), (
        f"jobs overlapped: {on_gpu}"
    )
    # It was sent while a job was on the GPU: if it had not waited its turn, the jobs would have
    # covered its whole span but for the moments between them.
    assert on_gpu[0][0] < sent, (on_gpu, sent)
    took = stages(response)
    needed = took["encode"] + took["denoise"] + took["decode"]
    latest = answered - took["video"] - took["interpolate"]
    free, since = [], sent
    for start, end in on_gpu:
        free.append(min(start, latest) - since)
        since = max(since, end)
    free.append(latest - since)
    assert max(free) >= needed - rounding, f"no free turn of {needed} s between {sent} and {latest}: jobs {on_gpu}"
    response = httpx.get(f"{server.url}/generate_task/get", params={"task_id": tasks[2].id}, timeout=60)
    assert response.headers["x-seed"] == "3" and json.loads(response.headers["x-settings"])["num_frames"] == 8


def test_the_page_is_static_files_under_a_policy_that_runs_only_them(server):
    page = httpx.get(f"{server.url}/ui", follow_redirects=True, timeout=60)
    assert page.status_code == 200 and str(page.url).endswith("/ui/")
    assert '<script src="app.js" defer></script>' in page.text and "<style" not in page.text
    assert "<script>" not in page.text, "no inline script: CSP allows 'self' only"
    for name, kind in [("app.js", "javascript"), ("style.css", "text/css"), ("controls.json", "application/json")]:
        response = httpx.get(f"{server.url}/ui/{name}", timeout=60)
        assert response.status_code == 200 and kind in response.headers["content-type"], name
        policy = response.headers["content-security-policy"]
        assert "script-src 'self';" in policy and "style-src 'self';" in policy and "default-src 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    controls = httpx.get(f"{server.url}/ui/controls.json", timeout=60).json()
    assert [control["name"] for control in controls][:3] == ["decode_chunk_size", "seed", "width"]
    escape = httpx.get(f"{server.url}/ui/%2E%2E/%2E%2E/service.py", timeout=60)
    assert escape.status_code == 404 and "bentoml" not in escape.text


def test_a_gif_faster_than_browsers_play_is_refused_before_generating(server):
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    data = {**SMALL, "format": "gif", "fps": "30", "interpolate": "2"}
    response = httpx.post(f"{server.url}/generate", files=files, data=data, timeout=60)
    assert response.status_code == 400 and "fps x interpolate must be at most 50 for a gif" in response.json()["error"]


def test_swagger_s_front_page_describes_this_service(server):
    info = httpx.get(f"{server.url}/docs.json", timeout=60).json()["info"]
    description = info["description"]
    for words in ("Stable Video Diffusion XT", "GPU", "(/ui/)", "X-Seed", "X-Settings", "X-Output-Id", "/readyz"):
        assert words in description, words
    assert "created with BentoML" not in description and "shields.io" not in description
