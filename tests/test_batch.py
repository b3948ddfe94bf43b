"""The batch client: a folder of images in, a folder of videos and a manifest out, resumably."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from harness import ASSETS, PHOTO, SMALL, decode_video
from svd.media.video import VideoWriter
from svd.tools import batch

SMALL_OPTIONS = [f"--{name.replace('_', '-')}={value}" for name, value in SMALL.items()]
TINY_OPTIONS = ["--width=64", "--height=64", "--num-frames=4", "--num-inference-steps=2"]


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Two good images, a corrupt one, one already done, and a file that is not an image."""
    folder = tmp_path / "images"
    folder.mkdir()
    with Image.open(PHOTO) as photo:
        photo.resize((192, 128)).save(folder / "rocket.jpg", quality=85)
        photo.resize((128, 96)).save(folder / "done.JPEG")
    with Image.open(ASSETS / "astronaut.png") as astronaut:
        astronaut.resize((128, 128)).save(folder / "astronaut.png")
    (folder / "bad.jpg").write_bytes((folder / "rocket.jpg").read_bytes()[:2000])
    (folder / "notes.txt").write_text("not an image")
    return folder


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def by_input(lines: list[dict]) -> dict[str, dict]:
    return {Path(line["input"]).name: line for line in lines}


def test_a_folder_becomes_videos_and_a_rerun_resumes(server, images, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "done.mp4").write_bytes(b"made earlier")
    command = [str(images), str(out), "--url", server.url, "--concurrency", "2", "--seed", "7", *SMALL_OPTIONS]

    assert batch.main(command) == 1
    assert capsys.readouterr().out.strip() == "2 ok, 1 skipped, 1 failed; failed: bad.jpg"
    # No video for the bad image or the text file, and no temporary file left behind.
    assert sorted(p.name for p in out.iterdir()) == ["astronaut.mp4", "done.mp4", "manifest.jsonl", "rocket.mp4"]
    for name in ("astronaut.mp4", "rocket.mp4"):
        video = decode_video(out / name)
        assert video.size == (256, 128) and len(video.frames) == 8
    assert (out / "done.mp4").read_bytes() == b"made earlier"

    lines = by_input(manifest(out))
    assert set(lines) == {"astronaut.png", "bad.jpg", "done.JPEG", "rocket.jpg"}
    rocket = lines["rocket.jpg"]
    assert rocket["status"] == "ok" and rocket["output"] == str(out / "rocket.mp4")
    assert rocket["seed"] == 7 and rocket["error"] is None and rocket["seconds"] > 0
    # What was sent came back; what was not sent took the server's default.
    assert rocket["settings"].items() >= {**SMALL, "seed": 7, "fps": 7, "format": "mp4"}.items()
    assert lines["done.JPEG"] == {
        "input": str(images / "done.JPEG"), "output": str(out / "done.mp4"), "status": "skipped",
        "seed": None, "settings": None, "seconds": 0.0, "error": None,
    }
    assert lines["bad.jpg"]["status"] == "failed"
    assert lines["bad.jpg"]["error"].startswith("HTTP 400") and "corrupt" in lines["bad.jpg"]["error"]

    made = {name: (out / name).stat().st_mtime_ns for name in ("astronaut.mp4", "rocket.mp4")}
    assert batch.main(command) == 1
    assert capsys.readouterr().out.strip() == "0 ok, 3 skipped, 1 failed; failed: bad.jpg"
    rerun = by_input(manifest(out)[4:])
    assert {name: line["status"] for name, line in rerun.items()} == {
        "astronaut.png": "skipped", "bad.jpg": "failed", "done.JPEG": "skipped", "rocket.jpg": "skipped",
    }
    assert made == {name: (out / name).stat().st_mtime_ns for name in made}

    (images / "bad.jpg").unlink()
    assert batch.main(command) == 0
    assert capsys.readouterr().out.strip() == "0 ok, 3 skipped, 0 failed"
    assert len(manifest(out)) == 11


def test_format_names_the_video(server, images, tmp_path, capsys):
    for name in ("rocket.jpg", "bad.jpg", "done.JPEG"):
        (images / name).unlink()
    out = tmp_path / "out"
    assert batch.main([str(images), str(out), "--url", server.url, "--format", "gif", *SMALL_OPTIONS]) == 0
    video = decode_video(out / "astronaut.gif")
    assert video.size == (256, 128) and len(video.frames) == 8
    assert manifest(out)[0]["settings"]["format"] == "gif"


def test_two_images_with_one_name_do_not_overwrite_each_other(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("rocket.jpg", "rocket.png"):
        (images / name).write_bytes(b"image")
    out = tmp_path / "out"
    out.mkdir()
    (out / "rocket.mp4").write_bytes(b"made earlier")
    # No server: the one image with a free name was done already, the other may not take its name.
    assert batch.main([str(images), str(out), "--url", "http://127.0.0.1:9"]) == 1
    lines = by_input(manifest(out))
    assert lines["rocket.jpg"]["status"] == "skipped"
    assert lines["rocket.png"]["status"] == "failed"
    assert lines["rocket.png"]["error"] == "rocket.jpg already makes rocket.mp4"


# A scripted stand-in for the service: each request to a route gets the route's next answer; "drop"
# hangs up without one. With `upstream`, the routes it has no answer for are passed on to that
# service, and "lost" passes the request on but hangs up without its answer.
@dataclass
class Stub:
    url: str
    requests: list[tuple[str, dict[str, str], bytes]]

    def sent(self, route: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for request, headers, body in self.requests if request == route]


SUBMIT = "POST /generate_task/submit"
EVENTS = "GET /generate_task/events"
GET = "GET /generate_task/get"
HOP_BY_HOP = {"connection", "content-length", "keep-alive", "transfer-encoding"}


@contextmanager
def stub_server(answers: dict[str, list], upstream: str | None = None) -> Iterator[Stub]:
    scripts = {route: iter(script) for route, script in answers.items()}
    requests: list[tuple[str, dict[str, str], bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            route = f"{self.command} {self.path.partition('?')[0]}"
            requests.append((route, dict(self.headers), body))
            answer = next(scripts.get(route, iter(())), None)
            if answer is None or answer == "lost":
                assert upstream is not None, f"no answer scripted for {route}"
                self.forward(body, send=answer is None)
            elif answer != "drop":  # HTTP/1.0: a drop closes the connection with no response at all
                status, headers, content = answer
                self.send_response(status)
                for key, value in {"Content-Length": str(len(content)), **headers}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(content)

        def forward(self, body: bytes, send: bool) -> None:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in {"host", *HOP_BY_HOP}}
            with httpx.stream(self.command, f"{upstream}{self.path}", headers=headers, content=body, timeout=60) as got:
                if not send:
                    got.read()  # answered, but the client never hears it
                    return
                self.send_response(got.status_code)
                for key, value in got.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.end_headers()
                # Chunk by chunk, so that the event stream's events come as they are sent.
                for chunk in got.iter_raw():
                    self.wfile.write(chunk)
                    self.wfile.flush()

        do_GET = do_POST = answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Stub(f"http://127.0.0.1:{server.server_port}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def mp4(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("stub") / "clip.mp4"
    writer = VideoWriter(path, 64, 64, fps=7)
    writer.write(np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8))
    writer.close()
    return path.read_bytes()


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "rocket.jpg").write_bytes(PHOTO.read_bytes())
    return folder


TASK_ID = "0123456789abcdef0123456789abcdef"
QUEUED = (200, {"Content-Type": "application/json"}, json.dumps({"task_id": TASK_ID, "status": "in_queue"}).encode())


def ended(status: str, **progress: object) -> tuple[int, dict[str, str], bytes]:
    """An event stream whose one event is the job's end."""
    event = json.dumps({"task_id": TASK_ID, "status": status, "error": None, "error_status": None, **progress})
    return 200, {"Content-Type": "text/event-stream"}, f"id: 1\ndata: {event}\n\n".encode()


def ok(mp4: bytes) -> tuple[int, dict[str, str], bytes]:
    settings = json.dumps({"width": 64, "height": 64, "num_frames": 3, "seed": 5})
    return 200, {"Content-Type": "video/mp4", "X-Seed": "5", "X-Settings": settings}, mp4


def keys(stub: Stub) -> set[str]:
    return {headers["Idempotency-Key"] for headers, _ in stub.sent(SUBMIT)}


def test_busy_answers_are_retried_after_retry_after_with_the_same_key(one_image, tmp_path, mp4, monkeypatch, capsys):
    # Were Retry-After ignored, the backoff would wait at least 30 s before each retry.
    monkeypatch.setattr(batch, "BACKOFF_SECONDS", 60.0)
    monkeypatch.setenv("SVD_API_TOKEN", "secret")
    busy = (503, {"Retry-After": "0"}, b'{"error":"out of GPU memory"}')
    limited = (429, {"Retry-After": "0"}, b'[{"error":"too many requests"}]')
    out = tmp_path / "out"
    script = {SUBMIT: [busy, limited, QUEUED], EVENTS: [ended("completed")], GET: [ok(mp4)]}
    with stub_server(script) as stub:
        assert batch.main([str(one_image), str(out), "--url", stub.url, "--fps", "5", "--sizing", "crop"]) == 0
    assert (out / "rocket.mp4").read_bytes() == mp4
    [line] = manifest(out)
    assert line["status"] == "ok" and line["seed"] == 5 and line["settings"]["num_frames"] == 3
    err = capsys.readouterr().err
    assert "retry  rocket.jpg in 0.0 s: HTTP 503: out of GPU memory" in err
    assert "retry  rocket.jpg in 0.0 s: HTTP 429: too many requests" in err
    assert [route for route, _, _ in stub.requests] == [SUBMIT, SUBMIT, SUBMIT, EVENTS, GET]
    assert all(headers["Authorization"] == "Bearer secret" for _, headers, _ in stub.requests)
    assert len(keys(stub)) == 1
    for _, body in stub.sent(SUBMIT):
        # Only the options given are sent, so the server's defaults apply to the rest.
        assert re.findall(rb'; name="([^"]+)"', body) == [b"fps", b"sizing", b"image"]


def test_dropped_connections_are_retried_and_half_videos_never_kept(one_image, tmp_path, mp4, monkeypatch):
    monkeypatch.setattr(batch, "BACKOFF_SECONDS", 0.01)
    cut_short = (200, {"Content-Length": str(len(mp4))}, mp4[:100])
    out = tmp_path / "out"
    script = {SUBMIT: ["drop", QUEUED, QUEUED], EVENTS: [ended("completed")] * 2, GET: [cut_short, ok(mp4)]}
    with stub_server(script) as stub:
        assert batch.main([str(one_image), str(out), "--url", stub.url, "--retries", "2"]) == 0
    assert len(stub.sent(SUBMIT)) == 3 and len(keys(stub)) == 1
    assert (out / "rocket.mp4").read_bytes() == mp4
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "rocket.mp4"]


def test_retries_are_bounded_and_leave_no_partial_file(one_image, tmp_path, mp4, capsys):
    busy = (503, {"Retry-After": "0"}, b'{"error":"busy"}')
    cut_short = (200, {"Content-Length": str(len(mp4))}, mp4[:100])
    out = tmp_path / "out"
    with stub_server({SUBMIT: [busy, QUEUED], EVENTS: [ended("completed")], GET: [cut_short]}) as stub:
        assert batch.main([str(one_image), str(out), "--url", stub.url, "--retries", "1"]) == 1
    assert len(stub.sent(SUBMIT)) == 2
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]
    [line] = manifest(out)
    assert line["status"] == "failed" and "gave up after 2 attempts" in line["error"]
    assert capsys.readouterr().out.strip() == "0 ok, 0 skipped, 1 failed; failed: rocket.jpg"


@pytest.mark.parametrize(
    ("end", "error"),
    [
        (ended("failed", error="ran out of GPU memory", error_status=422), "HTTP 422: ran out of GPU memory"),
        (ended("canceled"), "the job was canceled"),
    ],
)
def test_a_job_that_ends_without_a_video_records_why_and_is_not_sent_again(one_image, tmp_path, end, error):
    out = tmp_path / "out"
    with stub_server({SUBMIT: [QUEUED], EVENTS: [end]}) as stub:
        assert batch.main([str(one_image), str(out), "--url", stub.url]) == 1
    assert [route for route, _, _ in stub.requests] == [SUBMIT, EVENTS]
    [line] = manifest(out)
    assert line["status"] == "failed" and line["error"] == f"{error} (task {TASK_ID})"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl"]


def test_a_submit_whose_answer_is_lost_is_retried_into_the_same_one_job(server, one_image, tmp_path, monkeypatch):
    monkeypatch.setattr(batch, "BACKOFF_SECONDS", 0.01)
    logged_before = len(server.log_text())
    out = tmp_path / "out"
    # The service queues the first submit, but its answer never reaches the client.
    with stub_server({SUBMIT: ["lost"]}, upstream=server.url) as stub:
        command = [str(one_image), str(out), "--url", stub.url, "--seed", "4", "--retries", "1", *TINY_OPTIONS]
        assert batch.main(command) == 0
    # Both submits reached the service, which answered them one job, and ran it once.
    log = server.log_text()[logged_before:]
    submitted = re.findall(r"SVD job (\w+) submitted", log)
    assert len(submitted) == 2 and len(set(submitted)) == 1, log
    assert len(re.findall(rf"SVD job {submitted[0]} started", log)) == 1, log
    status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": submitted[0]}, timeout=30).json()
    assert status["status"] == "completed" and status["attempt"] == 1
    assert len(stub.sent(SUBMIT)) == 2 and len(keys(stub)) == 1
    [line] = manifest(out)
    assert line["status"] == "ok" and line["seed"] == 4
    video = decode_video(out / "rocket.mp4")
    assert video.size == (64, 64) and len(video.frames) == 4
