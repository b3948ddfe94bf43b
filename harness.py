"""What a user would check on a video they got back, plus a real `bentoml serve` to get it from.

Shared by the tests and the benchmarks, which import it and nothing of each other.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio_ffmpeg
import numpy as np

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
PHOTO = ASSETS / "rocket.jpg"
# Small requests keep the suite fast; one test runs the full default size.
SMALL = {"width": 256, "height": 128, "num_frames": 8, "num_inference_steps": 2}


@dataclass
class Video:
    path: Path
    meta: dict
    frames: np.ndarray  # (frames, height, width, 3) uint8

    @property
    def codec(self) -> str:
        return self.meta["codec"].split()[0]

    @property
    def pix_fmt(self) -> str:
        return self.meta["pix_fmt"].split("(")[0]

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.meta["size"])  # type: ignore[return-value]


def decode_video(path: Path) -> Video:
    """Decode every frame with the bundled ffmpeg, keeping what ffmpeg says about the stream."""
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(frame, np.uint8).reshape(height, width, 3) for frame in reader]
    return Video(path, meta, np.stack(frames))


def top_level_boxes(path: Path) -> list[str]:
    """The MP4's top-level box types in file order (moov before mdat means it streams)."""
    data = path.read_bytes()
    boxes, offset = [], 0
    while offset + 8 <= len(data):
        size = int.from_bytes(data[offset : offset + 4], "big")
        boxes.append(data[offset + 4 : offset + 8].decode("latin-1"))
        if size == 1:
            size = int.from_bytes(data[offset + 8 : offset + 16], "big")
        if size < 8:
            break
        offset += size
    return boxes


def assert_browser_safe_mp4(video: Video, width: int, height: int, frames: int, fps: float = 7) -> None:
    assert video.codec == "h264", video.meta
    assert video.pix_fmt == "yuv420p", video.meta
    assert video.size == (width, height)
    assert len(video.frames) == frames
    assert video.meta["fps"] == fps
    boxes = top_level_boxes(video.path)
    assert boxes.index("moov") < boxes.index("mdat"), boxes
    assert not all(np.array_equal(video.frames[0], frame) for frame in video.frames[1:]), "all frames equal"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll `condition` until it returns something truthy or the deadline passes.

    A request of the condition's that times out counts as "not yet": on two cores busy
    generating, one answer may be slow, and the deadline decides, not one read.
    """
    slow = _slow_answers()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result = condition()
        except slow:
            result = None
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"{what} not met within {timeout} s")


def _slow_answers() -> tuple[type[BaseException], ...]:
    try:
        import httpx  # not above: the GPU tier runs where only the generation core is installed
    except ImportError:
        return ()
    return (httpx.TimeoutException,)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    tmp: Path

    def leftover_files(self) -> list[Path]:
        """Regular files the server left in its temporary directory."""
        return [path for path in self.tmp.rglob("*") if path.is_file() and "prometheus" not in str(path)]

    def workers(self) -> list[int]:
        """The pids of the server's workers: its children, each in a session of its own."""
        return children(self.process.pid)

    def worker_rss(self) -> int:
        """Resident bytes of the server's processes (the worker holds the model)."""
        total = 0
        for pid in [self.process.pid, *self.workers()]:
            try:
                text = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue  # the process ended meanwhile
            if match := re.search(r"VmRSS:\s+(\d+) kB", text):
                total += int(match.group(1)) * 1024
        return total

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def children(parent: int) -> list[int]:
    """Live processes whose parent is `parent`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        if int(fields[1]) == parent and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def _ready(url: str, process: subprocess.Popen, log: Path) -> bool:
    import httpx  # here, not above: the GPU tier runs where only the generation core is installed

    if process.poll() is not None:
        raise RuntimeError(f"bentoml serve exited with {process.returncode}:\n{log.read_text()[-4000:]}")
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def serve(
    tmp_path: Path,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    wait_ready: bool = True,
    bento: Path | None = None,
) -> Iterator[Server]:
    """A real `bentoml serve` on 127.0.0.1 and a free port, stopped on exit: of this checkout, or of
    a built Bento as its container runs it (below).

    Its temporary files go to tmp_path/tmp, so tests can check none are left.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / f"serve-{port}.log"
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        "SVD_MODEL_ID": "tiny",
        "BENTOML_HOME": str(tmp_path / "bentoml"),
        "TMPDIR": str(tmp_path / "tmp"),
        "SVD_OUTPUT_DIR": str(tmp_path / "outputs"),
    }
    address = ["--host", "127.0.0.1", "--port", str(port)]
    if bento is None:
        command, cwd = [sys.executable, "-m", "bentoml", "serve", "service:StableDiffusionVideo", *address], ROOT
    else:
        command, cwd = bento_command(bento, address, full_env)
    full_env.update(env or {})
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=cwd, env=full_env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        if wait_ready:
            wait_until(lambda: _ready(url, process, log), timeout, 0.5, "server ready")
        yield Server(url, process, log, tmp_path / "tmp")
    finally:
        stop(process)


def build_bento(home: Path, **env: str) -> Path:
    """`bentoml build .` of this checkout into the BentoML home `home`, offline; the Bento's folder."""
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "."],
        cwd=ROOT,
        env={**os.environ, "BENTOML_HOME": str(home), "HF_HUB_OFFLINE": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode != 0:
        raise RuntimeError(f"bentoml build failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    (bento,) = [path for path in (home / "bentos" / "stable_diffusion_video").iterdir() if path.name != "latest"]
    return bento


def bento_command(bento: Path, address: list[str], env: dict[str, str]) -> tuple[list[str], Path]:
    """The image's entrypoint (`env/docker/entrypoint.sh`, which runs `bentoml serve "$BENTO_PATH"`) in
    the image's working folder, the Bento, with this venv's `bentoml` first on PATH. Nothing of the
    checkout is importable: no PYTHONPATH, and the Bento's own `src` is what BentoML puts on sys.path.
    SVD_OUTPUT_DIR is left to the image's default, as a container gets it. Updates `env` to match."""
    env.pop("PYTHONPATH", None)
    env.pop("SVD_OUTPUT_DIR", None)
    env["BENTO_PATH"] = str(bento)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return ["bash", str(bento / "env" / "docker" / "entrypoint.sh"), *address], bento


def stop(process: subprocess.Popen, timeout: float = 30) -> None:
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


@dataclass
class Redis:
    """A real redis-server on 127.0.0.1 and a free port, with append-only persistence in `folder`,
    as deploy/ runs it: stopped and started again, it comes back with its data on the same port."""

    folder: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.port = self.port or free_port()
        self.folder.mkdir(parents=True, exist_ok=True)
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)]
        command += ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
        with (self.folder / "redis.log").open("ab") as sink:
            self.process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.process.returncode}: see {self.folder / 'redis.log'}"
                )
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_until(answers, 30, 0.05, "redis-server answering")

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


@contextmanager
def redis_server(folder: Path) -> Iterator[Redis]:
    server = Redis(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class S3:
    """A standalone S3 API server (moto's) on 127.0.0.1 and a free port, in this process, with
    credentials of its own: stopped and started again, it comes back with its objects on the
    same port, as a bucket that was unreachable for a while does."""

    port: int = 0
    secret: str = ""
    server: Any = None

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach it: the standard AWS variables."""
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "svd-test-key",
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
        self.port = self.port or free_port()
        self.secret = self.secret or f"svd-test-secret-{os.urandom(8).hex()}"
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        """Unreachable: connections are refused, not left waiting."""
        if self.server is not None:
            self.server.stop()
            self.server._server.server_close()  # stop() leaves the socket listening
            self.server = None

    def client(self) -> Any:
        import boto3

        env = self.env
        return boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_REGION"],
        )

    def bucket(self, name: str) -> str:
        """A new bucket; its s3:// URL."""
        self.client().create_bucket(Bucket=name)
        return f"s3://{name}"

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in the bucket, by key."""
        client = self.client()
        listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
        return {item["Key"]: client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read() for item in listed}


@contextmanager
def s3_server() -> Iterator[S3]:
    server = S3()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def require_redis_server() -> None:
    """For a test module that needs Redis: skip it where redis-server is missing, fail in CI, where
    scripts/test.sh installs it."""
    import shutil

    import pytest

    if shutil.which("redis-server") is not None:
        return
    if os.environ.get("CI"):
        pytest.fail(
            "no redis-server on PATH: scripts/test.sh installs it (apt-get install redis-server)", pytrace=False
        )
    pytest.skip(
        "no redis-server on PATH (apt-get install redis-server, or run scripts/test.sh)", allow_module_level=True
    )


def submit_job(server: Server, **data: str | int) -> str:
    """A job of the rocket photo at SMALL (with `data` over it), submitted; its task id."""
    import httpx

    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    response = httpx.post(f"{server.url}/generate_task/submit", files=files, data={**SMALL, **data}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["task_id"]


def job_status(server: Server, task_id: str) -> dict:
    import httpx

    response = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def job_video(server: Server, task_id: str, path: Path, frames: int = SMALL["num_frames"]) -> None:
    """The job's video from /generate_task/get, written to `path` and decoded: `frames` frames."""
    import httpx

    response = httpx.get(f"{server.url}/generate_task/get", params={"task_id": task_id}, timeout=60)
    assert response.status_code == 200, response.text
    path.write_bytes(response.content)
    assert len(decode_video(path).frames) == frames


def metric(server: Server, name: str) -> float:
    """A gauge's value on the server's /metrics."""
    import httpx

    text = httpx.get(f"{server.url}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))
