"""The built Bento is the product: what `bentoml deploy` uploads, what `bentoml containerize` puts in
the image and what deploy/ runs. These tests take the Bento the session built (offline, the
`bento` fixture), check what it holds against the checkout, and serve it as its container does:
the image's entrypoint in the image's working folder, with nothing of the checkout importable.

What they cannot do here: build the image (no Docker daemon) or push it (no registry). The
generated Dockerfile is read instead, for what the image needs from it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest

from harness import PHOTO, ROOT, SMALL, Server, assert_browser_safe_mp4, bento_command, decode_video, serve, wait_until
from svd.http.page import STATIC
from svd.tools.gpu_check import PHOTO as GPU_CHECK_PHOTO

# Where the image keeps the Bento (BENTO_PATH) and whom it runs as; see env/docker/Dockerfile.
IMAGE_BENTO_PATH = "/home/bentoml/bento"
IMAGE_USER = "bentoml"
PIN = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", re.MULTILINE)


def _files(folder: Path) -> set[str]:
    return {
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_the_bento_holds_the_whole_package_the_files_it_opens_and_nothing_else(bento: Path):
    package = {f"svd/{name}" for name in _files(ROOT / "svd")}
    # Files the package opens by path at run time: the page, and the photo of svd.tools.gpu_check.
    opened = {path.relative_to(ROOT).as_posix() for path in [*STATIC.iterdir(), GPU_CHECK_PHOTO]}
    assert opened - package == {"assets/rocket.jpg"}, "the page's files are in the package"
    shipped = _files(bento / "src")
    assert package - shipped == set(), "modules or files of the package missing from the Bento"
    assert shipped == {"service.py", "bentofile.yaml", *package, *opened}, "only what the service needs"


def test_the_bento_s_python_requirements_are_the_ones_the_tests_ran_with(bento: Path):
    """requirements.txt pins every package (scripts/lock.sh); the Bento ships those pins as they are,
    and this test run has each of them installed at that very version."""
    pins = dict(PIN.findall((ROOT / "requirements.txt").read_text()))
    # BentoML appends its own pin, the same one.
    assert dict(PIN.findall((bento / "env" / "python" / "requirements.in").read_text())) == pins
    assert {"bentoml", "diffusers", "torch", "transformers", "imageio-ffmpeg", "redis", "standardwebhooks"} <= set(pins)
    # The image installs env/python/requirements.txt: the same pins, whatever BentoML adds.
    assert dict(PIN.findall((bento / "env" / "python" / "requirements.txt").read_text())) == pins
    # torch's local label says which build (+cpu here): the version is what is pinned.
    installed = {name: version(name).split("+")[0] for name in pins}
    assert {name: pin for name, pin in pins.items() if installed[name] != pin} == {}, installed


def test_the_image_installs_ffmpeg_serves_the_bento_and_may_write_where_it_keeps_videos(bento: Path):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if line.startswith("RUN apt-get install")]
    assert any(re.search(r"\bffmpeg\b", line) for line in installs), installs
    assert f"ARG BENTO_PATH={IMAGE_BENTO_PATH}" in dockerfile and "WORKDIR $BENTO_PATH" in dockerfile
    assert f'ENTRYPOINT [ "{IMAGE_BENTO_PATH}/env/docker/entrypoint.sh" ]' in dockerfile
    assert 'bentoml serve "$@" "$BENTO_PATH"' in (bento / "env" / "docker" / "entrypoint.sh").read_text()
    # The whole Bento is copied in owned by the user the image runs as, so SVD_OUTPUT_DIR's
    # default (outputs/ in the Bento's src, where the served Bento below writes it) is writable.
    owner = f"--chown={IMAGE_USER}:{IMAGE_USER}"
    copy, user = dockerfile.index(f"COPY {owner} . ./"), dockerfile.index(f"USER {IMAGE_USER}")
    assert copy < user and dockerfile.count("\nUSER ") == 1


@pytest.fixture(scope="module")
def served(bento: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(tmp_path_factory.mktemp("bento-served"), bento=bento) as running:
        yield running


def test_nothing_of_the_checkout_is_importable_where_the_bento_is_served(bento: Path, tmp_path: Path):
    env = {**os.environ}
    command, cwd = bento_command(bento, [], env)
    check = "import importlib.util as u; print(u.find_spec('svd'), u.find_spec('service'), u.find_spec('harness'))"
    result = subprocess.run([sys.executable, "-c", check], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["None", "None", "None"], result.stdout + result.stderr
    assert command[1] == str(bento / "env" / "docker" / "entrypoint.sh")


def test_the_served_bento_answers_the_tutorial_s_curl_from_its_own_code(served: Server, bento: Path, tmp_path: Path):
    out, headers = tmp_path / "small.mp4", tmp_path / "headers"
    fields = " ".join(f"-F '{key}={value}'" for key, value in SMALL.items())
    command = (
        f"curl -X 'POST' '{served.url}/generate' -H 'accept: video/*' -H 'Content-Type: multipart/form-data' "
        f"-F 'image=@{PHOTO};type=image/png' -o {out} -F 'decode_chunk_size=2' -F 'seed=null' {fields} -D {headers}"
    )
    assert subprocess.run(command, shell=True, capture_output=True, timeout=600).returncode == 0
    assert_browser_safe_mp4(decode_video(out), 256, 128, 8)
    output_id = re.search(r"(?im)^x-output-id: (\w+)", headers.read_text())[1]
    # Kept at the image's default SVD_OUTPUT_DIR, inside the Bento: the service runs from there.
    assert (bento / "src" / "outputs" / f"{output_id}.mp4").read_bytes() == out.read_bytes()


def test_the_served_bento_runs_a_job_from_submit_to_get(served: Server, tmp_path: Path):
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    submitted = httpx.post(f"{served.url}/generate_task/submit", files=files, data={**SMALL, "seed": 7}, timeout=60)
    assert submitted.status_code == 200, submitted.text
    task_id = submitted.json()["task_id"]

    def finished() -> str | None:
        status = httpx.get(f"{served.url}/generate_task/status", params={"task_id": task_id}, timeout=30).json()[
            "status"
        ]
        return None if status in ("pending", "in_progress") else status

    assert wait_until(finished, 300, 0.5, "the job finished") == "completed"
    progress = httpx.post(f"{served.url}/progress", json={"task_id": task_id}, timeout=30).json()
    assert progress["stage"] == "done"
    got = httpx.get(f"{served.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
    assert got.status_code == 200 and got.headers["x-seed"] == "7"
    (tmp_path / "job.mp4").write_bytes(got.content)
    assert_browser_safe_mp4(decode_video(tmp_path / "job.mp4"), 256, 128, 8)


def test_the_served_bento_publishes_its_schema_page_and_metrics(served: Server):
    schema = httpx.get(f"{served.url}/docs.json", timeout=30).json()
    assert {"/generate", "/generate_task/submit", "/progress"} <= set(schema["paths"])
    assert "Stable Video Diffusion XT" in schema["info"]["description"]
    page = httpx.get(f"{served.url}/ui/", timeout=30)
    assert page.status_code == 200 and '<script src="app.js" defer></script>' in page.text
    script = httpx.get(f"{served.url}/ui/app.js", timeout=30)
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.text == (STATIC / "app.js").read_text()
    controls = httpx.get(f"{served.url}/ui/controls.json", timeout=30).json()
    assert controls[0]["name"] == "decode_chunk_size"
    metrics = httpx.get(f"{served.url}/metrics", timeout=30).text
    assert "svd_jobs_waiting" in metrics and "svd_generations_total" in metrics


def test_the_bento_s_gpu_check_runs_from_the_bento_alone(bento: Path, tmp_path: Path):
    """`python -m svd.tools.gpu_check` inside the image checks its GPU; here, without one, the tiny model."""
    env = {**os.environ}
    bento_command(bento, [], env)
    report = tmp_path / "gpu_check.json"
    result = subprocess.run(
        [sys.executable, "-m", "svd.tools.gpu_check", "--json", str(report)],
        cwd=bento / "src",
        env={**env, "SVD_DEVICE": "auto"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert json.loads(report.read_text())["settings"]["width"] == 256
