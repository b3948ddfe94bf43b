"""The web page at /ui and the Swagger UI at /, used in a real headless Chromium.

Needs Debian's chromium (on PATH) and Playwright for Python; never a
browser that Playwright downloads. Every request off the test servers is refused,
so nothing reaches the network (the Swagger page asks Google Tag Manager).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator

import pytest

from harness import PHOTO, SMALL, Server, assert_browser_safe_mp4, decode_video, serve
from svd.base.params import CONTROLS, Range

# Found as scripts/test.sh finds it, which installs it where it is missing.
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    if os.environ.get("CI"):
        pytest.fail("no chromium on PATH: scripts/test.sh installs it (apt-get install chromium)", pytrace=False)
    pytest.skip("no chromium on PATH (apt-get install chromium, or run scripts/test.sh)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
expect = sync_api.expect
# Playwright's assertions wait 5 s by default; the page answers as soon as the service does, which
# on two cores busy generating can take longer. A deadline, not an expected time.
expect.set_options(timeout=30_000)

CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
GENERATION_MS = 180_000  # a tiny generation takes seconds; this is only the deadline
TOKEN = "s3cret"

# Keeps every text the progress line shows, to check the run was followed step by step.
RECORD_PROGRESS = """
window.progressTexts = [];
document.addEventListener("DOMContentLoaded", () => {
  const line = document.getElementById("progress-text");
  if (!line) return;
  new MutationObserver(() => window.progressTexts.push(line.textContent))
    .observe(line, { childList: true, characterData: true, subtree: true });
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A second `bentoml serve` that wants an API token (SVD_API_TOKEN)."""
    with serve(tmp_path_factory.mktemp("locked"), env={"SVD_API_TOKEN": TOKEN}) as running:
        yield running


@pytest.fixture
def page(browser) -> Iterator:
    """A fresh tab that can reach the test servers only; fails the test on any script error."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.route(
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith("http://127.0.0.1:") else route.abort(),
    )
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    errors: list[str] = []
    tab.on("pageerror", lambda error: errors.append(str(error)))
    tab.on(
        "console",
        lambda message: errors.append(message.text)
        if message.type == "error" and "Content Security Policy" in message.text
        else None,
    )
    yield tab
    context.close()
    assert errors == [], errors


def fill_small(page, **overrides: str) -> None:
    """Open Advanced and ask for a tiny video, as a user would type it."""
    page.locator("summary", has_text="Advanced").click()
    for name, value in {**{key: str(value) for key, value in SMALL.items()}, **overrides}.items():
        page.fill(f"#{name}", value)


def test_the_page_generates_a_video_and_shows_its_seed_and_settings(page, server, tmp_path):
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{server.url}/ui")
    expect(page.get_by_role("heading", name="Stable Video Diffusion XT")).to_be_visible()
    page.get_by_label("Random").check()  # the default: no seed is sent
    page.set_input_files("#image", PHOTO)
    expect(page.locator("#preview")).to_be_visible()
    page.wait_for_function("() => document.getElementById('preview').naturalWidth > 0")
    fill_small(page, num_inference_steps="24")  # denoising spans several of the page's polls
    page.get_by_role("button", name="Generate").click()

    # Playable (enough data to play on), or an error to report at once rather than at the deadline.
    page.wait_for_function(
        "() => document.querySelector('#media video')?.readyState >= 3 || !document.getElementById('error').hidden",
        timeout=GENERATION_MS,
    )
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#result-seed")).to_have_text(re.compile(r"^\d+$"))
    seed = page.locator("#result-seed").inner_text()
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done \(\d+ s\)$"))
    assert page.evaluate("document.getElementById('progress').value") == 1
    texts = page.evaluate("window.progressTexts")
    assert len(texts) >= 2 and texts[-1].startswith("Done"), texts
    counted = [text for text in texts if re.match(r"(Denoising step|Decoding frames) \d+ of \d+", text)]
    assert any(text.startswith("Denoising step") for text in counted), f"not followed step by step: {texts}"
    shown = r"(Denoising step \d+ of 24|Decoding frames \d of 8)( — about \d+ (s|min))? \("
    assert all(re.match(shown, text) for text in counted), texts

    video = page.locator("#media video")
    for attribute in ("controls", "autoplay", "loop", "muted", "playsInline"):
        assert video.evaluate(f"v => v.{attribute}"), attribute
    assert video.evaluate("v => [v.videoWidth, v.videoHeight]") == [256, 128]
    settings = page.locator("#settings").inner_text()
    for row in (
        "width\t256",
        "height\t128",
        "num_frames\t8",
        "num_inference_steps\t24",
        "format\tmp4",
        "sizing\tstretch",
    ):
        assert row in settings, settings

    with page.expect_download() as download:
        page.locator("#download").click()
    assert download.value.suggested_filename == f"svd-seed{seed}-256x128.mp4"
    saved = tmp_path / download.value.suggested_filename
    download.value.save_as(saved)
    assert_browser_safe_mp4(decode_video(saved), 256, 128, 8)

    page.get_by_role("button", name="Reuse this seed").click()
    expect(page.locator("#seed")).to_have_value(seed)
    expect(page.locator("#seed")).to_be_enabled()

    page.evaluate("window.scrollTo(0, 0)")
    screenshot = tmp_path / "ui.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000


def _js(number: float) -> str:
    """A number as an input's attribute shows it."""
    return str(int(number)) if float(number).is_integer() else str(number)


def test_the_page_follows_a_job_through_its_event_stream_with_its_place_in_line_and_eta(page, server):
    """Two jobs ahead of the page's, of the size the service has just run once: '2nd in line, about N s'."""
    import httpx

    from svd.tools.client import follow

    size = {"width": 64, "height": 64, "num_frames": 4, "num_inference_steps": 10}

    def submit() -> str:
        with PHOTO.open("rb") as image:
            files = {"image": ("rocket.jpg", image, "image/jpeg")}
            answer = httpx.post(f"{server.url}/generate_task/submit", files=files, data=size, timeout=60)
        return answer.json()["task_id"]

    assert list(follow(server.url, submit(), timeout=120))[-1]["status"] == "completed"  # its speed, measured
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{server.url}/ui")
    page.set_input_files("#image", PHOTO)
    fill_small(page, **{name: str(value) for name, value in size.items()})
    ahead = [submit(), submit()]
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=GENERATION_MS)
    expect(page.locator("#error")).to_be_hidden()
    texts = page.evaluate("window.progressTexts")
    waiting = [text for text in texts if text.startswith("Waiting in the queue")]
    in_line = r"Waiting in the queue… — (2nd|1st) in line, about \d+ (s|min) \("
    assert any(re.match(in_line, text) for text in waiting), texts
    assert any(re.match(r"Denoising step \d+ of 10 — about \d+ s \(", text) for text in texts), texts
    assert page.evaluate("document.getElementById('progress-text').dataset.via") == "events"
    for task_id in ahead:
        status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id}, timeout=30).json()
        assert status["status"] == "completed"


def test_the_form_is_made_from_the_service_s_controls(page, server):
    """Each control's field: its label, default, range and choices, where Advanced puts it."""
    page.goto(f"{server.url}/ui")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    expect(page.locator("#preview")).to_be_hidden()  # no broken image before a file is chosen
    for control in CONTROLS:
        field = page.locator(f"#{control.name}")
        shown = field.evaluate(
            """input => ({
                label: document.querySelector(`label[for="${input.id}"]`).firstChild.textContent,
                value: input.value, min: input.min, max: input.max, step: input.step, type: input.type,
                options: input.options ? [...input.options].map((option) => option.value) : null,
                advanced: document.getElementById("advanced").contains(input),
            })"""
        )
        assert shown["label"] == control.look.label and shown["advanced"] == control.look.advanced, control.name
        default = "" if control.default is None else str(control.default) if control.choices else _js(control.default)
        assert shown["value"] == default, control.name
        if isinstance(control.allowed, Range):
            top = "" if control.allowed.high is None else _js(control.allowed.high)
            assert (shown["min"], shown["max"]) == (_js(control.allowed.low), top), control.name
            assert shown["type"] == ("range" if control.look.slider else "number")
            if control.kind is int:
                assert shown["step"] == str(control.allowed.step), control.name
        else:
            assert shown["options"] == [str(choice) for choice in control.choices], control.name


def test_a_longer_smoother_video_reports_its_segments(page, server):
    page.add_init_script(RECORD_PROGRESS)
    page.goto(f"{server.url}/ui")
    page.set_input_files("#image", PHOTO)
    fill_small(page, segments="2", num_inference_steps="8")  # steps enough for polls to see each segment
    page.select_option("#interpolate", "2")
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=GENERATION_MS)
    expect(page.locator("#error")).to_be_hidden()
    texts = page.evaluate("window.progressTexts")
    assert any(text.startswith("Segment 1 of 2: ") for text in texts), texts
    assert any(text.startswith("Segment 2 of 2: ") for text in texts), texts
    video = page.locator("#media video")
    page.wait_for_function("() => document.querySelector('#media video')?.readyState >= 1", timeout=GENERATION_MS)
    assert video.evaluate("v => v.duration") == pytest.approx(29 / 14, abs=0.1), "15 frames at 7 fps, doubled"
    settings = page.locator("#settings").inner_text()
    assert "segments\t2" in settings and "interpolate\t2" in settings, settings


def test_cancel_beside_the_progress_bar_stops_the_job(page, server):
    import httpx

    page.goto(f"{server.url}/ui")
    page.set_input_files("#image", PHOTO)
    fill_small(page, num_inference_steps="100")  # long enough to press Cancel while it denoises
    with page.expect_response(re.compile(r".*/generate_task/submit$")) as submitted:
        page.get_by_role("button", name="Generate").click()
    task_id = submitted.value.json()["task_id"]
    expect(page.locator("#progress-text")).to_have_text(
        re.compile(r"^Denoising step \d+ of 100"), timeout=GENERATION_MS
    )
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator("#error")).to_contain_text(
        "Cancelled: the service stopped the job and made no video", timeout=GENERATION_MS
    )
    expect(page.get_by_role("button", name="Generate")).to_be_enabled(timeout=GENERATION_MS)
    status = httpx.get(f"{server.url}/generate_task/status", params={"task_id": task_id}, timeout=30).json()
    assert status["status"] == "canceled"
    step = httpx.post(f"{server.url}/progress", json={"task_id": task_id}, timeout=30).json()["step"]
    assert step < 100, "stopped before its last step"


def test_recent_videos_are_listed_and_open_again(page, server):
    import httpx

    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    made = httpx.post(f"{server.url}/generate", files=files, data={**SMALL, "seed": 31337}, timeout=300)
    assert made.status_code == 200
    page.goto(f"{server.url}/ui")
    entry = page.locator("#recent-list button", has_text="seed 31337")
    expect(entry).to_be_visible()
    entry.first.click()
    page.wait_for_function("() => document.querySelector('#media video')?.readyState >= 1", timeout=GENERATION_MS)
    expect(page.locator("#result-seed")).to_have_text("31337")
    assert page.locator("#media video").evaluate("v => [v.videoWidth, v.videoHeight]") == [256, 128]


def test_an_invalid_field_is_explained_in_words(page, server):
    page.goto(f"{server.url}/ui")
    page.set_input_files("#image", PHOTO)
    fill_small(page, width="1000")
    page.get_by_role("button", name="Generate").click()

    error = page.get_by_role("alert")
    expect(error).to_contain_text("could not use these settings", timeout=GENERATION_MS)
    expect(error).to_contain_text("Width (width): must be a multiple of 64 from 64 to 1024, got 1000")
    assert "Traceback" not in error.inner_text() and "{" not in error.inner_text()
    expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()


def test_a_token_in_the_address_is_sent_on_every_call(page, locked_server):
    """With SVD_API_TOKEN set, `?token=` opens the page and the page sends it as a Bearer header."""
    sent: dict[str, set[str | None]] = {}

    def record(request) -> None:
        if request.resource_type == "fetch":
            route = re.sub(r"^http://[^/]+|\?.*$", "", request.url)
            sent.setdefault(route, set()).add(request.headers.get("authorization"))

    page.on("request", record)
    page.goto(f"{locked_server.url}/ui?token={TOKEN}")
    expect(page.locator("#token")).to_have_value(TOKEN)
    page.set_input_files("#image", PHOTO)
    fill_small(page)
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=GENERATION_MS)
    # The page follows the job through its event stream (polling /progress and status only where it is refused).
    calls = {"/generate_task/submit", "/generate_task/events", "/generate_task/get", "/outputs/"}
    assert calls <= set(sent), sent
    assert all(tokens == {f"Bearer {TOKEN}"} for tokens in sent.values()), sent

    page.fill("#token", "wrong")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert")).to_contain_text("The service needs a valid API token")
    expect(page.locator("#token")).to_have_attribute("aria-invalid", "true")
    page.reload()  # the token stays in the address, so the page still loads
    expect(page.get_by_role("heading", name="Stable Video Diffusion XT")).to_be_visible()


def test_a_file_that_is_not_an_image_is_explained_in_words(page, server):
    page.goto(f"{server.url}/ui")
    page.set_input_files("#image", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not a picture"})
    fill_small(page)
    page.get_by_role("button", name="Generate").click()

    error = page.get_by_role("alert")
    expect(error).to_contain_text("not an image the service can read", timeout=GENERATION_MS)
    expect(error).to_contain_text("image is not an image this service can read; accepted formats: PNG, JPEG")
    assert "Traceback" not in error.inner_text()
    expect(page.locator("#result")).to_be_hidden()


def test_a_missing_image_is_explained_before_calling_the_service(page, server):
    page.goto(f"{server.url}/ui")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert")).to_have_text("Choose an image first.")


def test_swagger_ui_try_it_out_generates_a_video(page, server):
    page.goto(f"{server.url}/")
    operation = page.locator('.opblock-post:has(.opblock-summary-path[data-path="/generate"])')
    operation.locator(".opblock-summary").first.click()
    operation.get_by_role("button", name="Try it out").click()
    operation.locator('tr[data-property-name="image"] input[type=file]').set_input_files(PHOTO)
    for name, value in SMALL.items():
        operation.locator(f'tr[data-property-name="{name}"] input[placeholder="{name}"]').fill(str(value))
    operation.get_by_role("button", name="Execute").click()

    live = operation.locator(".live-responses-table tr.response")  # the answer received, not the documented ones
    status = live.locator(".response-col_status")
    status.wait_for(timeout=GENERATION_MS)
    assert status.inner_text().strip() == "200", live.inner_text()
    headers = live.locator(".response-col_description .microlight").last
    expect(headers).to_contain_text(re.compile("content-type: video/mp4", re.I))
    expect(headers).to_contain_text(re.compile(r"x-seed: \d+", re.I))


# Keeps the progress line's text each time the live preview shows a new image.
RECORD_PREVIEWS = """
window.previewsShown = [];
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live-preview");
  new MutationObserver(() => {
    if (live.getAttribute("src")) window.previewsShown.push(document.getElementById("progress-text").textContent);
  }).observe(live, { attributes: true, attributeFilter: ["src"] });
});
"""


def test_the_page_shows_a_live_preview_of_the_video_while_it_is_made(page, locked_server):
    """With a token, which the page sends for the preview as for every call: an <img src> could not."""
    fetched: list[str | None] = []

    def record(request) -> None:
        if "/generate_task/preview" in request.url:
            fetched.append(request.headers.get("authorization"))

    page.on("request", record)
    page.add_init_script(RECORD_PREVIEWS)
    page.goto(f"{locked_server.url}/ui?token={TOKEN}")
    page.set_input_files("#image", PHOTO)
    fill_small(page, num_inference_steps="100")  # denoising spans many polls, and several previews
    page.get_by_role("button", name="Generate").click()

    live = page.locator("#live-preview")
    expect(live).to_be_visible(timeout=GENERATION_MS)
    page.wait_for_function("() => document.getElementById('live-preview').naturalWidth > 0")
    assert live.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [256 // 8, 128 // 8], "one pixel per latent"
    shown, bar = live.bounding_box(), page.locator("#progress").bounding_box()
    assert shown["width"] > 8 * 32 and shown["y"] + shown["height"] <= bar["y"], "large, above the progress bar"

    expect(page.locator("#progress-text")).to_have_text(re.compile(r"^Done"), timeout=GENERATION_MS)
    expect(page.locator("#error")).to_be_hidden()
    expect(live).to_be_hidden()  # the video takes its place
    page.wait_for_function("() => document.querySelector('#media video')?.readyState >= 1", timeout=GENERATION_MS)
    texts = page.evaluate("window.previewsShown")
    assert len(texts) >= 2, f"the preview was not updated as the page polled: {texts}"
    assert any(text.startswith("Denoising step") for text in texts), texts
    assert fetched and set(fetched) == {f"Bearer {TOKEN}"}, fetched
