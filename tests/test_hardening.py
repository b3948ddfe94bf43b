"""Bad input, URLs, oversized uploads, overload, deadlines, leaks and metrics against a real server."""

from __future__ import annotations

import io
import re
import select
import socket
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from harness import PHOTO, SMALL, decode_video, serve, wait_until

TINY = {"width": 128, "height": 64, "num_frames": 4, "num_inference_steps": 1}


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A valid PNG whose header claims width x height, with hardly any data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def tiff_header(width: int, height: int) -> bytes:
    """A small TIFF whose header says it is width x height."""
    buffer = io.BytesIO()
    Image.new("L", (64, 64)).save(buffer, format="TIFF")
    data = bytearray(buffer.getvalue())
    first_ifd = int.from_bytes(data[4:8], "little")
    for entry in range(int.from_bytes(data[first_ifd : first_ifd + 2], "little")):
        at = first_ifd + 2 + 12 * entry
        tag = int.from_bytes(data[at : at + 2], "little")
        if tag in (256, 257):  # ImageWidth, ImageLength
            kind = int.from_bytes(data[at + 2 : at + 4], "little")
            size = 2 if kind == 3 else 4
            value = width if tag == 256 else height
            data[at + 8 : at + 8 + size] = min(value, 2 ** (8 * size) - 1).to_bytes(size, "little")
    return bytes(data)


def post(url: str, files=None, data=None, timeout: float | httpx.Timeout = 120, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/generate", files=files, data=data, timeout=timeout, **kwargs)


def photo(name: str = "rocket.jpg", content: bytes | None = None, kind: str = "image/jpeg"):
    return {"image": (name, PHOTO.read_bytes() if content is None else content, kind)}


BAD_INPUTS = {
    "text file": (photo("notes.txt", b"not a picture at all\n", "text/plain"), {}, 415, "not an image"),
    "html as png": (photo("page.png", b"<html><body>hi</body></html>", "image/png"), {}, 415, "not an image"),
    "zero bytes": (photo("empty.jpg", b""), {}, 400, "empty"),
    "truncated jpeg": (photo("cut.jpg", PHOTO.read_bytes()[:5000]), {}, 400, "truncated or corrupt"),
    "garbage after a png header": (photo("x.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200), {}, 415, "not an image"),
    "ppm": (photo("x.ppm", b"P6\n96 96\n255\n" + b"\0" * 96 * 96 * 3), {}, 415, "accepted formats"),
    "too small": (photo("dot.png", png(32, 32)), {}, 400, "at least 64"),
    "too many pixels": (photo("huge.png", png(8000, 6000)), {}, 413, "megapixels"),
    "missing image": (None, {"width": "256"}, 400, "image"),
    "empty image field": ({"image": ("", b"", "application/octet-stream")}, {}, 400, "image"),
    "wrong type": (photo(), {"num_frames": "many"}, 400, "num_frames"),
    "absurdly large": (photo(), {"num_inference_steps": "9" * 40}, 400, "num_inference_steps"),
    "infinite": (photo(), {"noise_aug_strength": "-inf"}, 400, "noise_aug_strength"),
    "float for int": (photo(), {"width": "256.5"}, 400, "width"),
    "a png claiming 100000x100000": (photo("bomb.png", png_header(100_000, 100_000)), {}, 413, "too large"),
    "a tiff claiming 60000x60000": (photo("bomb.tif", tiff_header(60_000, 60_000)), {}, 413, "too large"),
    "a 300-byte file name": (photo("a" * 296 + ".jpg"), {}, 400, "the limit is 200"),
    "two images": ([("image", ("a.jpg", PHOTO.read_bytes(), "image/jpeg"))] * 2, {}, 400, "sent more than once"),
    "5000 extra fields": (
        photo(),
        {f"field{index}": "1" for index in range(5000)},
        400,
        "Maximum number of fields is 1000",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_a_clear_4xx_and_the_next_request_works(server, case: str):
    files, data, status, message = BAD_INPUTS[case]
    response = post(server.url, files=files, data={**TINY, **data})
    assert response.status_code == status, response.text
    assert message in response.text
    assert "Traceback" not in response.text
    assert post(server.url, files=photo(), data=TINY).status_code == 200


def test_a_url_in_place_of_the_image_is_refused_without_any_connection(server):
    hits: list[bytes] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            hits.append(connection.recv(1024))
            connection.close()

    thread = threading.Thread(target=record)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/photo.jpg"
    try:
        response = post(server.url, data={**TINY, "image": url})
        as_json = httpx.post(f"{server.url}/generate", json={**TINY, "image": url}, timeout=30)
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert response.status_code == 400 and "never downloads URLs" in response.text
    assert as_json.status_code == 400
    assert hits == []
    assert post(server.url, files=photo(), data=TINY).status_code == 200


def test_a_path_or_url_in_a_json_body_is_refused_and_never_read(server, tmp_path: Path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(PHOTO.read_bytes())  # an image the server could read, were it to try
    for image in (f"file://{secret}", str(secret), "http://127.0.0.1:9/photo.jpg"):
        response = httpx.post(f"{server.url}/generate", json={**TINY, "image": image}, timeout=30)
        assert response.status_code == 400 and "must be an uploaded file" in response.text, image


def _animation(frames: int) -> bytes:
    """A GIF whose frames all differ, so that none is merged away."""
    import numpy as np

    ramp = np.add.outer(np.arange(64), np.arange(64))
    images = [Image.fromarray(((ramp + index) % 256).astype(np.uint8), "L").convert("P") for index in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:])
    return buffer.getvalue()


def test_an_animation_of_two_thousand_frames_uses_its_first_frame_only(server, monkeypatch: pytest.MonkeyPatch):
    from PIL import GifImagePlugin

    from svd.media.images import prepare_image

    gif = _animation(2000)
    assert Image.open(io.BytesIO(gif)).n_frames == 2000
    response = post(server.url, files=photo("many.gif", gif, "image/gif"), data=TINY)
    assert response.status_code == 200, response.text
    # The same preparation in-process: no frame past the first is ever read.
    seeks: list[int] = []
    real_seek = GifImagePlugin.GifImageFile.seek
    monkeypatch.setattr(
        GifImagePlugin.GifImageFile, "seek", lambda self, frame: (seeks.append(frame), real_seek(self, frame))[1]
    )
    path = Path(tempfile.mkdtemp()) / "many.gif"
    path.write_bytes(gif)
    assert prepare_image(path, 64, 64, "stretch", 40_000_000).size == (64, 64)
    assert max(seeks, default=0) == 0, f"frames read: {sorted(set(seeks))[:5]}…"


def test_upload_names_never_become_paths(server):
    escape = server.tmp.parent / "escaped.jpg"
    response = post(server.url, files=photo("../../escaped.jpg"), data=TINY)
    assert response.status_code == 200
    longest = post(server.url, files=photo("/".join(["dir"] * 100) + "/" + "a" * 196 + ".jpg"), data=TINY)
    assert longest.status_code == 200, "a long path with a name at the limit is fine"
    assert not escape.exists() and not list(server.tmp.parent.rglob("escaped.jpg"))
    wait_until(lambda: not server.leftover_files(), 30, what="temp files removed")


def test_uploads_above_the_limit_get_413_before_decoding(server):
    # Default limit 20 MB: a 21 MB body, refused from its Content-Length.
    oversized = {"image": ("big.jpg", b"\xff\xd8" + b"\0" * 21_000_000, "image/jpeg")}
    response = post(server.url, files=oversized, data=TINY)
    assert response.status_code == 413 and "SVD_MAX_UPLOAD_BYTES" in response.text


def test_a_body_streamed_without_content_length_is_cut_at_the_limit(server):
    def chunks():
        # 21 MB in 1 MB chunks, above the default 20 MB: no Content-Length says so in advance.
        yield b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.jpg\"\r\n\r\n"
        for _ in range(21):
            yield b"\0" * 1_000_000

    headers = {"Content-Type": "multipart/form-data; boundary=b"}
    response = httpx.post(f"{server.url}/generate", content=chunks(), headers=headers, timeout=60)
    assert "content-length" not in response.request.headers, "streamed, chunked"
    assert response.status_code == 413 and "SVD_MAX_UPLOAD_BYTES" in response.json()["error"]


@pytest.mark.parametrize("route", ["/generate", "/generate_task", "/generate_task/submit", "/progress"])
def test_a_multipart_body_without_its_boundary_is_400_not_500(server, route: str):
    response = httpx.post(
        f"{server.url}{route}",
        headers={"Content-Type": "multipart/form-data"},
        content=b"--x\r\n\r\n--x--\r\n",
        timeout=30,
    )
    assert response.status_code == 400 and "needs its boundary" in response.json()["error"]
    assert "KeyError" not in server.log_text()


@pytest.mark.parametrize("route", ["/generate", "/generate_task", "/generate_task/submit", "/progress"])
def test_a_multipart_body_that_does_not_parse_is_400_before_any_work(server, route: str):
    """A boundary, then a part with no headers and no closing delimiter: BentoML's parser failed on it with a 500."""
    headers = {"Content-Type": "multipart/form-data; boundary=x"}
    response = httpx.post(
        f"{server.url}{route}", headers=headers, content=b"--x\r\ngarbage without headers", timeout=30
    )
    assert response.status_code == 400, response.text
    assert "could not be read as multipart/form-data" in response.json()["error"]
    assert "MultipartParseError" not in server.log_text()


def _read_response(connection: socket.socket) -> str:
    """One whole HTTP response off a raw socket: headers and body may come in separate packets."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _content_length(data):
        chunk = connection.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


def _content_length(data: bytes) -> int:
    match = re.search(rb"content-length: (\d+)", data, re.IGNORECASE)
    return int(match.group(1)) if match else 0


def test_a_stalled_upload_is_cut_and_holds_up_nobody(tmp_path: Path):
    with serve(tmp_path, env={"SVD_UPLOAD_TIMEOUT": "3"}) as slow:
        port = int(slow.url.rsplit(":", 1)[1])
        stalled = socket.create_connection(("127.0.0.1", port))
        stalled.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
            b"filename=\"a.jpg\"\r\n\r\n" + b"\xff" * 100
        )
        start = time.monotonic()
        assert post(slow.url, files=photo(), data=TINY).status_code == 200, "served while the other upload stalls"
        stalled.settimeout(30)
        answer = _read_response(stalled)
        stalled.close()
        assert answer.startswith("HTTP/1.1 408") and "SVD_UPLOAD_TIMEOUT" in answer, answer

        # A body that keeps coming, a byte at a time, never whole within the limit.
        dribbled = socket.create_connection(("127.0.0.1", port))
        dribbled.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n"
        )
        start = time.monotonic()
        # A byte every 0.2 s until the server answers: the whole body would take 5.5 hours.
        while not select.select([dribbled], [], [], 0.2)[0] and time.monotonic() - start < 300:
            dribbled.sendall(b"\xff")
        answered = time.monotonic() - start
        dribbled.settimeout(30)
        answer = _read_response(dribbled)
        dribbled.close()
        assert answer.startswith("HTTP/1.1 408") and "SVD_UPLOAD_TIMEOUT" in answer, answer
        # Not before the limit; after it, whenever the server gets to it, long before the body ends.
        assert answered > 2.5, "cut at the limit, though bytes kept coming"


def test_a_client_that_disconnects_crashes_nothing(server):
    with pytest.raises(httpx.ReadTimeout):
        post(server.url, files=photo(), data={**SMALL, "num_inference_steps": 30}, timeout=httpx.Timeout(30, read=0.5))
    response = post(server.url, files=photo(), data=TINY)
    assert response.status_code == 200
    wait_until(lambda: not server.leftover_files(), 60, what="temp files removed")


def test_thirty_requests_leave_no_files_and_memory_levels_off(server, tmp_path: Path):
    mixed = [photo(), photo("bad.txt", b"nope", "text/plain"), photo()]
    post(server.url, files=photo(), data=TINY)
    first = server.worker_rss()
    samples = []
    for index in range(30):
        response = post(server.url, files=mixed[index % 3], data=TINY)
        assert response.status_code == (415 if index % 3 == 1 else 200), (index, response.text)
        samples.append(server.worker_rss())
    growth_last_ten = samples[-1] - samples[-11]
    # Measured here: the worker's RSS settles within ~40 MB of the first request.
    assert samples[-1] - first < 150 * 2**20, [s // 2**20 for s in samples]
    assert growth_last_ten < 30 * 2**20, [s // 2**20 for s in samples]
    wait_until(lambda: not server.leftover_files(), 30, what="temp files removed")


def test_metrics_count_generations_refusals_frames_and_stages(server):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=60).text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("svd_")
        }

    before = scrape()
    assert post(server.url, files=photo(), data=TINY).status_code == 200
    assert post(server.url, files=photo("x.txt", b"text", "text/plain"), data=TINY).status_code == 415
    assert post(server.url, data={**TINY, "image": "http://example.com/a.jpg"}).status_code == 400
    after = scrape()

    def moved(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert moved('svd_generations_total{outcome="ok"}') == 1
    assert moved('svd_generations_total{outcome="bad_input"}') == 1
    assert moved('svd_requests_refused_total{reason="url_not_file"}') == 1
    assert moved("svd_frames_generated_total") == 4
    assert moved("svd_generation_seconds_count") == 1
    assert moved('svd_stage_seconds_count{stage="denoise"}') == 1
    assert "svd_oom_retries_total" in after
    # Refusals of each kind, and a job cancelled while it runs.
    before = scrape()
    assert post(server.url, files=photo(), data={**TINY, "motion_bucket": "3"}).status_code == 400
    oversized = {"image": ("big.jpg", b"\xff\xd8" + b"\0" * 21_000_000, "image/jpeg")}
    assert post(server.url, files=oversized, data=TINY).status_code == 413
    task_id = httpx.post(
        f"{server.url}/generate_task/submit", files=photo(), data={**SMALL, "num_inference_steps": 100}, timeout=30
    ).json()["task_id"]
    wait_until(
        lambda: (
            httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=60).json()["stage"] == "denoise"
        ),
        60,
    )
    assert httpx.put(f"{server.url}/generate_task/cancel", params={"task_id": task_id}, timeout=60).status_code == 200
    canceled = 'svd_generations_total{outcome="canceled"}'
    wait_until(lambda: scrape().get(canceled, 0) > before.get(canceled, 0), 30, what="the cancel counted")
    after = scrape()
    assert moved('svd_requests_refused_total{reason="unknown_field"}') == 1
    assert moved('svd_requests_refused_total{reason="too_large"}') == 1
    assert moved(canceled) == 1


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """A server with a one-deep queue and an API token."""
    env = {"SVD_MAX_QUEUE": "1", "SVD_API_TOKEN": "s3cret-token"}
    with serve(tmp_path_factory.mktemp("guarded"), env) as running:
        yield running


AUTH = {"Authorization": "Bearer s3cret-token"}


def test_token_is_required_except_for_probes_and_metrics(guarded):
    assert post(guarded.url, files=photo(), data=TINY).status_code == 401
    wrong = post(guarded.url, files=photo(), data=TINY, headers={"Authorization": "Bearer s3cret-tokeN"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert wrong.headers["x-served-by"] == "1", "a refusal names the worker too"
    assert httpx.get(f"{guarded.url}/docs.json").status_code == 401
    assert httpx.get(f"{guarded.url}/ui/").status_code == 401
    assert httpx.get(f"{guarded.url}/ui/", params={"token": "s3cret-token"}).status_code == 200
    assert httpx.get(f"{guarded.url}/ui/controls.json").status_code == 401
    assert httpx.get(f"{guarded.url}/outputs/").status_code == 401
    assert httpx.get(f"{guarded.url}/outputs/", headers=AUTH).status_code == 200
    assert httpx.get(f"{guarded.url}/ui/controls.json", headers=AUTH).status_code == 200
    # The browser loads the page's script and style without the token: they are code, not data.
    assert httpx.get(f"{guarded.url}/ui/app.js").status_code == 200
    assert httpx.post(f"{guarded.url}/ui/app.js").status_code == 401
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{guarded.url}{probe}").status_code == 200
    response = post(guarded.url, files=photo(), data=TINY, headers=AUTH)
    assert response.status_code == 200 and len(decode_video_bytes(response.content).frames) == 4


def _routes(url: str) -> set[str]:
    """Every route the app has: the API's (docs.json) and the mounted apps' (the service's schema),
    with BentoML's own pages; path parameters filled in."""
    from service import StableDiffusionVideo

    documented = httpx.get(f"{url}/docs.json", headers=AUTH).json()["paths"]
    paths = set(documented) | set(StableDiffusionVideo.schema()["paths"]) | {"/", "/docs.json", "/schema.json"}
    # Written out here: a route added to the code's open list must not drop out of this test.
    return {re.sub(r"\{[^}]+\}", "0" * 32, path) for path in paths} - {"/livez", "/readyz", "/healthz", "/metrics"}


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "OPTIONS", "PUT", "DELETE"])
def test_every_route_but_the_probes_needs_the_token(guarded, method: str):
    routes = _routes(guarded.url)
    assert {
        "/generate", "/generate_task/submit", "/generate_task/status", "/generate_task/get", "/generate_task/cancel",
        "/generate_task/retry", "/progress", "/ui", "/ui/controls.json", "/outputs/",
    } <= routes, routes
    with httpx.Client(base_url=guarded.url, timeout=30) as client:
        for route in sorted(routes):
            for variant in {route, "/" + route, route.rstrip("/") + "/", route + "?token=wrong"}:
                response = client.request(method, variant)
                assert response.status_code == 401, f"{method} {variant}: {response.status_code}"


def test_a_token_in_the_address_opens_the_page_only_and_is_never_logged(guarded):
    token = {"token": "s3cret-token"}
    assert httpx.get(f"{guarded.url}/ui/", params=token).status_code == 200
    assert httpx.get(f"{guarded.url}/ui", params=token, follow_redirects=True).status_code == 200
    for route in ("/docs.json", "/outputs/", "/generate_task/status", "/ui/controls.json"):
        assert httpx.get(f"{guarded.url}{route}", params=token).status_code == 401, route
    assert httpx.post(f"{guarded.url}/generate", params=token, files=photo(), data=TINY).status_code == 401
    # An access line is written once its answer is sent: wait for the last one.
    wait_until(lambda: "method=POST,path=/generate," in guarded.log_text(), 60, what="the requests logged")
    log = guarded.log_text()
    assert "method=GET,path=/ui/," in log, "the requests were logged"
    assert "s3cret-token" not in log


def test_a_burst_gets_200_or_429_with_retry_after_and_the_server_stays_healthy(guarded):
    def one(_: int) -> httpx.Response:
        return post(guarded.url, files=photo(), data=TINY, headers=AUTH)

    assert post(guarded.url, files=photo(), data=TINY).status_code == 401
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    codes = sorted(response.status_code for response in responses)
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1 and "SVD_MAX_QUEUE" in response.text
    assert httpx.get(f"{guarded.url}/readyz").status_code == 200
    assert one(0).status_code == 200
    text = httpx.get(f"{guarded.url}/metrics", timeout=60).text
    assert f'svd_requests_refused_total{{reason="busy"}} {codes.count(429)}.0' in text
    assert re.search(r'svd_requests_refused_total\{reason="unauthorized"\} [1-9]', text), text


def decode_video_bytes(content: bytes):
    path = Path(tempfile.mkdtemp()) / "video.mp4"
    path.write_bytes(content)
    return decode_video(path)


@pytest.mark.parametrize(
    ("request_", "stage"),
    [
        ({"width": 256, "height": 128, "num_frames": 8, "num_inference_steps": 20}, "denoise"),
        ({"width": 256, "height": 128, "num_frames": 8, "num_inference_steps": 1, "decode_chunk_size": 1}, "decode"),
    ],
    ids=["denoising", "decoding"],
)
def test_a_generation_past_its_deadline_stops_at_the_next_step_or_chunk(
    request_: dict, stage: str, monkeypatch: pytest.MonkeyPatch
):
    """Past its time limit, a generation stops within one step or chunk, not at its end.

    The generation's clock jumps past the deadline when it reports its third step or chunk of
    the stage, so where it must stop does not depend on how fast this machine is.
    """
    import svd.core.generate
    from svd.base.errors import Refused
    from svd.base.params import GenerationParams
    from svd.base.settings import Settings
    from svd.serving.engine import Engine

    engine = Engine(Settings(model_id="tiny", device="cpu"))
    assert engine.wait_ready(120)
    late = threading.Event()
    timeout = engine.settings.timeout
    clock = SimpleNamespace(
        monotonic=lambda: time.monotonic() + (2 * timeout if late.is_set() else 0), perf_counter=time.perf_counter
    )
    monkeypatch.setattr(svd.core.generate, "time", clock)
    reports: list[tuple[bool, str, int]] = []

    def report(progress) -> None:
        reports.append((late.is_set(), progress.stage, progress.step))
        if progress.stage == stage and progress.step == 3:
            late.set()

    with pytest.raises(Refused) as refused:
        engine.run(PHOTO, GenerationParams(**request_, seed=1), Path(tempfile.mkdtemp()), report=report)
    words = "denoising" if stage == "denoise" else "decoding"
    assert refused.value.status == 504 and f"stopped while {words}" in str(refused.value)
    after_deadline = [step for was_late, reported, step in reports if was_late and reported == stage]
    assert len(after_deadline) <= 1, f"went on {len(after_deadline)} {stage} steps past the deadline"
    assert engine.in_flight == 0, "the queue place is given back"
