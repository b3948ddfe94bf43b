"""Turn a folder of images into videos with a running service, resumably.

    python -m svd.tools.batch IMAGES_DIR OUT_DIR [--url URL] [--concurrency N] [--width 512 ...]

One video per image, named after it; outputs that already exist are skipped, so an
interrupted run picks up where it stopped. Every image gets a line in OUT_DIR/manifest.jsonl.

Each image is a job: submitted to /generate_task/submit, followed until it ends, its video
fetched from /generate_task/get. Every submit of one image carries the same Idempotency-Key, so a
retry after a lost answer gets the task already queued and the image is never generated twice.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Literal, get_args

import httpx
from tqdm import tqdm

from svd.base.params import CONTROLS, Control
from svd.tools.client import follow

TASK_ROUTE = "/generate_task"
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
RETRY_STATUSES = {429, 503}
# The first wait when the server gives no Retry-After; doubled per attempt up to BACKOFF_CAP.
BACKOFF_SECONDS = 2.0
BACKOFF_CAP = 60.0
# A submit or a download quiet for this long has stalled: it is retried, with the same key.
REQUEST_TIMEOUT = 60.0
MANIFEST = "manifest.jsonl"

Status = Literal["ok", "skipped", "failed"]


@dataclass(frozen=True)
class BatchItem:
    image: Path
    output: Path


@dataclass(frozen=True)
class Outcome:
    """One manifest line."""

    input: str
    output: str
    status: Status
    seed: int | None = None
    settings: Any = None
    seconds: float = 0.0
    error: str | None = None

    @classmethod
    def of(cls, job: BatchItem, status: Status, **extra: Any) -> Outcome:
        return cls(str(job.image), str(job.output), status, **extra)


class Rejected(Exception):
    """An answer that retrying would not change, such as a 4xx for a bad image."""


class Busy(Exception):
    """An answer worth retrying (429, 503), after `retry_after` seconds if the server said how long."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def find_jobs(images_dir: Path, out_dir: Path, video_format: str) -> list[BatchItem]:
    """The images directly in `images_dir`, by name, each with the video it becomes."""
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_TYPES)
    return [BatchItem(image, out_dir / f"{image.stem}.{video_format}") for image in images]


def backoff(attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return retry_after
    # Jitter keeps concurrent workers that were refused together from coming back together.
    return min(BACKOFF_CAP, BACKOFF_SECONDS * 2**attempt) * random.uniform(0.5, 1.0)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; an HTTP date or garbage falls back to our own backoff."""
    try:
        seconds = float(value or "")
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def error_message(response: httpx.Response) -> str:
    """The server's own words: BentoML answers {"error": ...}, at times in a list, with pydantic's details."""
    response.read()
    prefix = f"HTTP {response.status_code}"
    try:
        body = response.json()
    except ValueError:
        return f"{prefix}: {response.text.strip()[:300]}"
    body = body[0] if isinstance(body, list) and body else body
    if not isinstance(body, dict):
        return f"{prefix}: {body}"
    problems = [d for d in body.get("detail") or [] if isinstance(d, dict)]
    details = [f"{'.'.join(map(str, d.get('loc', [])))}: {d.get('msg')}" for d in problems]
    return f"{prefix}: {body.get('error')}" + (f" ({'; '.join(details)})" if details else "")


@dataclass(frozen=True)
class Service:
    """The running service, and how long one image's job may take (--timeout)."""

    client: httpx.Client
    token: str | None
    timeout: float


def refusal(response: httpx.Response) -> Busy | Rejected:
    """A refusal in the server's words: Busy when worth retrying, Rejected otherwise."""
    if response.status_code in RETRY_STATUSES:
        return Busy(error_message(response), parse_retry_after(response.headers.get("retry-after")))
    return Rejected(error_message(response))


def checked_answer(response: httpx.Response) -> httpx.Response:
    """The response if it is a 200; its refusal raised otherwise."""
    if response.status_code != 200:
        raise refusal(response)
    return response


def submit(client: httpx.Client, job: BatchItem, fields: dict[str, str], key: str) -> str:
    """The task id of the image's job: a new one, or the one its key already queued."""
    with job.image.open("rb") as image:
        files = {"image": (job.image.name, image, IMAGE_TYPES[job.image.suffix.lower()])}
        response = client.post(f"{TASK_ROUTE}/submit", files=files, data=fields, headers={"Idempotency-Key": key})
    return checked_answer(response).json()["task_id"]


def wait(service: Service, task_id: str) -> dict[str, Any]:
    """What /progress last says of the job: where it ended."""
    try:
        *_, ended = follow(str(service.client.base_url), task_id, service.token, service.timeout)
    except httpx.HTTPStatusError as exc:
        raise refusal(exc.response) from None
    return ended


def why_not(ended: dict[str, Any]) -> str:
    """Why a job that ended made no video, as /progress says: its error and its HTTP status, or its status."""
    why = ended.get("error") or f"the job was {ended['status']}"
    return f"HTTP {ended['error_status']}: {why}" if ended.get("error_status") else why


def download(client: httpx.Client, job: BatchItem, task_id: str) -> tuple[int | None, Any]:
    """The job's video, at job.output only once it has arrived whole; its seed and settings."""
    with client.stream("GET", f"{TASK_ROUTE}/get", params={"task_id": task_id}) as response:
        checked_answer(response)
        # A temporary name in the same directory, so the final rename is atomic and
        # a killed run never leaves a partial file that the next run would skip.
        fd, part = tempfile.mkstemp(dir=job.output.parent, prefix=f".{job.output.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as sink:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            os.replace(part, job.output)
        except BaseException:
            os.unlink(part)
            raise
        seed = response.headers.get("x-seed")
        settings = response.headers.get("x-settings")
    return (int(seed) if seed else None), (json.loads(settings) if settings else None)


def generate(service: Service, job: BatchItem, fields: dict[str, str], retries: int) -> Outcome:
    start = time.monotonic()
    # One key per image and run, kept for all its retries: the server answers them the task
    # the first submit queued. Not derived from the image: a rerun must try again an image whose
    # job failed, and make again a video deleted since, where the server would answer the old task.
    key = uuid.uuid4().hex

    def outcome(status: Status, **extra: Any) -> Outcome:
        return Outcome.of(job, status, seconds=round(time.monotonic() - start, 2), **extra)

    attempt = 0
    while True:
        try:
            task_id = submit(service.client, job, fields, key)
            ended = wait(service, task_id)
            if ended["status"] != "completed":
                return outcome("failed", error=f"{why_not(ended)} (task {task_id})")
            seed, settings = download(service.client, job, task_id)
            return outcome("ok", seed=seed, settings=settings)
        except Rejected as exc:
            return outcome("failed", error=str(exc))
        except TimeoutError:  # follow()'s deadline; before OSError, which it is one of
            return outcome("failed", error=f"no video within {service.timeout} s; raise --timeout")
        except OSError as exc:
            # An unreadable image or a full disk fails this image, not the whole batch.
            return outcome("failed", error=f"{type(exc).__name__}: {exc}")
        except (Busy, httpx.TransportError) as exc:
            # A read timeout too: submitted again with the same key, the job is not queued twice.
            error = str(exc) or type(exc).__name__
            if attempt == retries:
                return outcome("failed", error=f"{error} (gave up after {retries + 1} attempts)")
            delay = backoff(attempt, getattr(exc, "retry_after", None))
            tqdm.write(f"retry  {job.image.name} in {delay:.1f} s: {error}", file=sys.stderr)
            time.sleep(delay)
            attempt += 1


def triage(jobs: list[BatchItem]) -> tuple[list[BatchItem], list[Outcome]]:
    """The jobs to send, and the outcomes known without asking the server."""
    todo: list[BatchItem] = []
    known: list[Outcome] = []
    claimed: dict[Path, Path] = {}
    for job in jobs:
        if job.output in claimed:
            # rocket.jpg and rocket.png would both become rocket.mp4: the first by name keeps it.
            known.append(Outcome.of(job, "failed", error=f"{claimed[job.output].name} already makes {job.output.name}"))
        elif job.output.exists():
            known.append(Outcome.of(job, "skipped"))
        else:
            todo.append(job)
        claimed.setdefault(job.output, job.image)
    return todo, known


def run(
    jobs: list[BatchItem], out_dir: Path, service: Service, fields: dict[str, str], concurrency: int, retries: int
) -> list[Outcome]:
    """Every job with a progress bar; each outcome reaches the manifest as soon as it is known.

    Progress goes to stderr, like the bar, so stdout carries only the summary.
    """
    todo, known = triage(jobs)
    outcomes: list[Outcome] = []
    counts = dict.fromkeys(get_args(Status), 0)
    with tqdm(total=len(jobs), unit="image") as bar, ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(generate, service, job, fields, retries) for job in todo]
        try:
            for outcome in chain(known, (future.result() for future in as_completed(futures))):
                outcomes.append(outcome)
                # Only this thread appends, so lines never interleave.
                with (out_dir / MANIFEST).open("a") as manifest:
                    manifest.write(json.dumps(asdict(outcome)) + "\n")
                counts[outcome.status] += 1
                bar.write(describe(outcome), file=sys.stderr)
                bar.set_postfix(counts, refresh=False)
                bar.update()
        except KeyboardInterrupt:
            # Drop the queue; jobs in flight still finish and keep their videos.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return outcomes


def describe(outcome: Outcome) -> str:
    name = Path(outcome.input).name
    if outcome.status == "ok":
        return f"ok     {name} -> {Path(outcome.output).name} (seed {outcome.seed}, {outcome.seconds:.1f} s)"
    if outcome.status == "skipped":
        return f"skip   {name}: {Path(outcome.output).name} already exists"
    return f"failed {name}: {outcome.error}"


def summary(outcomes: list[Outcome]) -> str:
    counts = {status: sum(o.status == status for o in outcomes) for status in get_args(Status)}
    line = ", ".join(f"{count} {status}" for status, count in counts.items())
    failed = [Path(o.input).name for o in outcomes if o.status == "failed"]
    return line + (f"; failed: {', '.join(failed)}" if failed else "")


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def checked(control: Control) -> Callable[[str], Any]:
    """Parse and check an option as the server would, so a wrong one stops the run before any upload."""

    def parse(text: str) -> Any:
        try:
            return control.check(control.kind(text))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc) if "must be" in str(exc) else f"not a number: {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m svd.tools.batch",
        description="Generate one video per image (jpg, jpeg, png, webp) in IMAGES_DIR into OUT_DIR. "
        "Existing outputs are skipped, so rerunning resumes; OUT_DIR/manifest.jsonl records every image. "
        "Generation options left out take the server's defaults.",
    )
    parser.add_argument("images_dir", type=Path, metavar="IMAGES_DIR")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    add = parser.add_argument
    add("--url", default="http://localhost:3000", help="the service (default: %(default)s)")
    add("--concurrency", type=at_least(1), default=1, metavar="N", help="jobs in flight (default: 1)")
    add("--token", default=os.environ.get("SVD_API_TOKEN"), help="sent as a Bearer token (default: $SVD_API_TOKEN)")
    add("--timeout", type=float, default=900, metavar="SECONDS", help="to wait for one video (default: 900)")
    add("--retries", type=at_least(0), default=5, metavar="N", help="on 429, 503, lost answers (default: 5)")
    options = parser.add_argument_group(
        "generation options",
        "The same for every image; each left out takes the server's default (a seed: a random one each).",
    )
    for control in CONTROLS:
        choices = control.choices or None
        options.add_argument(
            f"--{control.name.replace('_', '-')}",
            type=checked(control),
            choices=choices,
            metavar=None if choices else {int: "N", float: "X"}[control.kind],
            help=control.help,
        )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.images_dir.is_dir():
        parser.error(f"{args.images_dir} is not a directory")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    # Only what the user set goes out, so the server's defaults apply to the rest.
    fields = {c.name: str(getattr(args, c.name)) for c in CONTROLS if getattr(args, c.name) is not None}
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    jobs = find_jobs(args.images_dir, args.out_dir, args.format or "mp4")
    timeout = httpx.Timeout(min(args.timeout, REQUEST_TIMEOUT), connect=min(args.timeout, 30.0))
    try:
        with httpx.Client(base_url=args.url, headers=headers, timeout=timeout) as client:
            service = Service(client, args.token, args.timeout)
            outcomes = run(jobs, args.out_dir, service, fields, args.concurrency, args.retries)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume")
        return 130
    print(summary(outcomes) if outcomes else f"no images (jpg, jpeg, png, webp) in {args.images_dir}")
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    raise SystemExit(main())
