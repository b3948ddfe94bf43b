"""The task routes of BentoML's task API, answered from the job store.

BentoML runs a task in the process that took it, with no cancel and no recovery, and
empties its store at every start. This ASGI middleware answers ROUTE/submit,
/status, /get, /cancel and /retry itself, with BentoML's JSON and status words, so
Swagger, `bentoml.SyncHTTPClient` and the web page work unchanged; the runners
(svd/jobs/runner.py) do the work. It also serves ROUTE/preview, a running job's live
preview (svd/storage/previews.py), and ROUTE/events, a job's changes as server-sent events
(svd/jobs/following.py). On a replica that runs no model (SVD_ROLE=api) it answers the
synchronous route too: queued as a job, answered with the job's video.

A submit with an `Idempotency-Key` header is answered once per key and user: the same key
and request again answer the job first queued, queuing nothing; the same key with another
request is refused (422). Keys are kept IDEMPOTENCY_SECONDS, in the job store.

Each job is its submitter's (svd/base/users.py): every route answers another user's job as it
answers one that does not exist (404), and the admin's sees all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from svd.base.errors import InputError, validation_message
from svd.base.ids import ID
from svd.base.params import GenerationParams
from svd.base.users import ADMIN, NOBODY, Caller, label_of
from svd.http.answers import error_response, unavailable
from svd.http.asgi import App, Receive, Scope, Send
from svd.http.middleware.auth import caller_of
from svd.http.outputs_routes import serve_output
from svd.jobs.following import CONTENT_TYPE as EVENTS_TYPE
from svd.jobs.following import QUEUE_FIELDS, READERS, JobEvents, QueuePlaces, progress_of
from svd.jobs.model import (
    CANCELED,
    COMPLETED,
    FAILED,
    FINISHED,
    Idempotency,
    Job,
    KeyReused,
    QueueFull,
    StoreUnavailable,
    UnknownJob,
    UserQueueFull,
    Webhook,
)
from svd.jobs.store import JobStore
from svd.jobs.webhooks.addresses import WebhookHosts, checked_address
from svd.serving import metrics
from svd.storage.outputs import Outputs
from svd.storage.previews import CONTENT_TYPE, previews_of
from svd.storage.storage import StorageUnavailable

logger = logging.getLogger(f"bentoml.{__name__}")

Handler = Callable[["JobRoutes", Request], Awaitable[Response]]
# Seconds a client waits before asking again when the store is unreachable.
UNAVAILABLE_RETRY_AFTER = 5
# What an Idempotency-Key may be: visible ASCII, as the IETF draft's examples (UUIDs and the like).
IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
# How often a synchronous request queued as a job looks at its job, and at its client.
QUEUED_POLL_SECONDS = 0.5


class JobRoutes:
    """Answers the task routes under `route` from the store `open_store()` opens in this process.

    `fields` validates a submitted job as the route's API would; `per_worker` bounds the jobs
    waiting or running for each worker taking jobs; `outputs` is where jobs keep their videos;
    `webhook_hosts` admits webhook URLs (None: the server sends no webhooks). With `queued`, the
    synchronous route it names, with its fields, is queued as a job and answered when the job ends.
    `per_user` bounds each user's jobs waiting or running (0: no bound); `users` are the names the
    configuration gives them. It also brings the queue's gauges up to date for each read of /metrics.
    """

    def __init__(
        self,
        app: App,
        route: str,
        open_store: Callable[[], JobStore],
        fields: type[BaseModel],
        per_worker: int,
        outputs: Outputs,
        max_pixels: int,
        webhook_hosts: WebhookHosts | None = None,
        queued: tuple[str, type[BaseModel]] | None = None,
        per_user: int = 0,
        users: frozenset[str] = frozenset(),
    ):
        self.app = app
        self.per_user = per_user
        self.users = users
        self.open_store = open_store
        self.fields = fields
        self.per_worker = per_worker
        self.outputs = outputs
        self.previews = previews_of(outputs)
        self.max_pixels = max_pixels
        self.webhook_hosts = webhook_hosts
        self.route = route
        self._store: JobStore | None = None
        self.places = QueuePlaces(lambda: self.store)
        self._readers: anyio.CapacityLimiter | None = None
        self.routes: dict[tuple[str, str], Handler] = {
            ("POST", f"{route}/submit"): JobRoutes.submit,
            ("GET", f"{route}/status"): JobRoutes.status,
            ("GET", f"{route}/get"): JobRoutes.get,
            ("PUT", f"{route}/cancel"): JobRoutes.cancel,
            ("POST", f"{route}/retry"): JobRoutes.retry,
            ("GET", f"{route}/preview"): JobRoutes.preview,
            ("GET", f"{route}/events"): JobRoutes.events,
        }
        self.queued_fields = queued[1] if queued else None
        if queued:
            self.routes[("POST", queued[0])] = JobRoutes.generate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = (scope.get("method", ""), scope.get("path", "")) if scope["type"] == "http" else None
        handler = self.routes.get(route) if route else None
        if handler is None:
            if route == ("GET", "/metrics"):
                await run_in_threadpool(self._measure_queue)
            await self.app(scope, receive, send)
            return
        try:
            response = await handler(self, Request(scope, receive))
        except StoreUnavailable as exc:
            logger.warning("SVD answered %s %s with 503: %s", scope["method"], scope["path"], exc)
            response = error_response(503, str(exc), headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})
        except StorageUnavailable as down:
            logger.warning("SVD answered %s %s with 503: %s", scope["method"], scope["path"], down.strerror)
            response = unavailable(down)
        except Exception:
            # BentoML's stack would leave the connection hanging without an answer.
            logger.exception("SVD could not answer %s %s", scope["method"], scope["path"])
            response = error_response(500, "the job store failed; the service's log says why")
        await response(scope, receive, send)

    def _measure_queue(self) -> None:
        try:
            depth = self.store.depth()
        except StoreUnavailable:
            return  # /readyz says so; the gauges keep their last values
        metrics.JOBS_WAITING.set(depth.waiting)
        metrics.JOBS_RUNNING.set(depth.running)
        metrics.OLDEST_WAITING_SECONDS.set(depth.oldest_waiting_seconds)
        # Every label, those with no job too: a user's gauges come back to 0 when their queue empties.
        counts = {label_of(owner, self.users): [0, 0] for owner in (*self.users, ADMIN, NOBODY)}
        for owner, jobs in depth.by_owner.items():
            count = counts.setdefault(label_of(owner, self.users), [0, 0])
            count[0], count[1] = count[0] + jobs[0], count[1] + jobs[1]
        for label, (waiting, running) in counts.items():
            metrics.USER_JOBS_WAITING.labels(user=label).set(waiting)
            metrics.USER_JOBS_RUNNING.labels(user=label).set(running)

    @property
    def store(self) -> JobStore:
        # Opened in the worker that serves, at its first job request, never where it is only imported.
        if self._store is None:
            self._store = self.open_store()
        return self._store

    async def submit(self, request: Request) -> Response:
        key = request.headers.get("idempotency-key")
        if key is not None and not IDEMPOTENCY_KEY.fullmatch(key):
            return error_response(
                400,
                f"`Idempotency-Key` must be 1 to 255 visible ASCII characters, such as a UUID; got {key[:80]!r}",
            )
        read = await self._read_job(request, self.fields)
        if isinstance(read, Response):
            return read
        image, image_name, controls, hook = read
        caller = caller_of(request.scope)
        once = None if key is None else _idempotency(caller, key, image, controls, hook)
        return _accepted(await self._queue(caller.name, image, image_name, controls, hook, once))

    async def generate(self, request: Request) -> Response:
        """The synchronous route on a replica without the model: its job waits in the queue for a GPU
        worker, and the answer is the job's video, as the route answers where the model runs. A client
        that goes away, or a request past the time limit, cancels the job."""
        assert self.queued_fields is not None
        read = await self._read_job(request, self.queued_fields)
        if isinstance(read, Response):
            return read
        job = await self._queue(caller_of(request.scope).name, *read)
        if isinstance(job, Response):
            return job
        ended = None
        try:
            while ended is None:
                found = await run_in_threadpool(self.store.get, job.id)
                if found is not None and found.status in FINISHED:
                    ended = found
                elif await request.is_disconnected():
                    break
                else:
                    await anyio.sleep(QUEUED_POLL_SECONDS)
        finally:
            if ended is None:
                await self._drop(job.id)
        return await self._answer(ended) if ended else error_response(499, "the client went away")

    async def _drop(self, job_id: str) -> None:
        """Cancel the job of a synchronous request that ended first: nobody is left to take its video."""
        with anyio.CancelScope(shield=True):
            try:
                await run_in_threadpool(self.store.cancel, job_id)
            except StoreUnavailable as exc:
                logger.warning("SVD job %s outlives its synchronous request, which ended: %s", job_id, exc)
                return
        logger.info("SVD job %s canceled: its synchronous request ended before the job", job_id)

    async def _read_job(
        self, request: Request, fields: type[BaseModel]
    ) -> tuple[bytes, str, dict[str, Any], Webhook | None] | Response:
        """The image, its name, its controls and its webhook from a job's form, or the refusal that says what was
        wrong with it."""
        try:
            form = await request.form(max_files=1, max_fields=len(fields.model_fields))
        except Exception as exc:  # python-multipart and Starlette raise several kinds for a body that does not parse
            return error_response(
                400, f"the body could not be read as multipart/form-data: {exc or type(exc).__name__}"
            )
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return error_response(400, "`image` is required: upload the still image as a multipart file part.")
            values = {name: _decoded(value) for name, value in form.multi_items() if name != "image"}
            controls = fields.model_validate({"image": "upload", **values}).model_dump(exclude={"image"})
            webhook, events = controls.pop("webhook", None), tuple(controls.pop("webhook_events_filter", ()))
            GenerationParams(**controls).check()
            if webhook is not None:
                if self.webhook_hosts is None:
                    return error_response(
                        400,
                        "`webhook`: this server sends no webhooks; its operator turns them on with SVD_WEBHOOK_SECRET",
                    )
                # Resolves the host: not on the event loop.
                await run_in_threadpool(checked_address, webhook, self.webhook_hosts)
            image = await upload.read()
            await run_in_threadpool(_check_image, image, self.max_pixels)
        except ValidationError as exc:
            errors = exc.errors(include_context=False, include_input=False)
            return error_response(400, validation_message(errors), detail=errors)
        except InputError as exc:
            return error_response(exc.status, str(exc))
        finally:
            await form.close()
        return image, upload.filename or "image", controls, Webhook(webhook, events) if webhook else None

    async def _queue(
        self,
        owner: str,
        image: bytes,
        image_name: str,
        controls: dict[str, Any],
        hook: Webhook | None = None,
        once: Idempotency | None = None,
    ) -> Job | Response:
        try:
            job = await run_in_threadpool(
                self.store.submit, image, image_name, controls, self.per_worker, hook, once, owner, self.per_user
            )
        except KeyReused as reused:
            return error_response(
                422,
                f"this Idempotency-Key was already used for task {reused.job_id}, with another request: "
                "send that request again to get that task, or use a new key for a new request",
                task_id=reused.job_id,
            )
        except QueueFull as full:
            metrics.REFUSED.labels(reason="busy").inc()
            retry_after = max(1, round(full.retry_after or 1))
            why = (
                f"you have {full.unfinished} jobs waiting or running, as many as one user may "
                "(SVD_MAX_QUEUE_PER_USER); retry once one has ended"
                if isinstance(full, UserQueueFull)
                else f"{full.unfinished} jobs are already waiting or running ({full.limit} at most: SVD_MAX_QUEUE, "
                f"{self.per_worker}, per worker taking jobs); retry later"
            )
            return error_response(429, why, headers={"Retry-After": str(retry_after)})
        logger.info("SVD job %s submitted%s", job.id, f" by {owner}" if owner else "")
        return job

    async def status(self, request: Request) -> Response:
        job = await self._job(request)
        if isinstance(job, Response):
            return job
        where = await run_in_threadpool(self._progress, job)
        return JSONResponse({**job.as_json(), **{name: where[name] for name in QUEUE_FIELDS}})

    async def events(self, request: Request) -> Response | EventStreamResponse:
        """The job's changes as server-sent events, until its end (svd/jobs/following.py)."""
        job = await self._job(request)
        if isinstance(job, Response):
            return job
        if self._readers is None:
            self._readers = anyio.CapacityLimiter(READERS)
        follow = JobEvents(
            job,
            lambda after: self.store.events(job.id, after),
            self._progress,
            request.headers.get("last-event-id"),
        )
        return EventStreamResponse(follow.stream(self._readers))

    def _progress(self, job: Job) -> dict[str, Any]:
        return progress_of(job, self.places, self.previews, self.route)

    async def get(self, request: Request) -> Response:
        job = await self._job(request)
        return job if isinstance(job, Response) else await self._answer(job)

    async def _answer(self, job: Job) -> Response:
        """A job's video, or why there is none."""
        if job.status == COMPLETED:
            found = await run_in_threadpool(self.outputs.find_job, job.id, job.attempt)
            if found is None:
                return error_response(404, f"the video of task {job.id} is no longer kept (SVD_OUTPUT_KEEP pruned it)")
            return serve_output(job.id, *found)
        if job.status == FAILED:
            return error_response(job.error_status or 500, job.error or "the job failed", status=job.status)
        if job.status == CANCELED:
            return error_response(409, f"task {job.id} was canceled; it made no video", status=job.status)
        return error_response(400, f"task {job.id} is not completed yet: it is {job.status}", status=job.status)

    async def cancel(self, request: Request) -> Response:
        job = await self._job(request)
        if isinstance(job, Response):
            return job
        try:
            job, canceled = await run_in_threadpool(self.store.cancel, job.id)
        except UnknownJob:
            return _unknown(job.id)
        if not canceled:
            return error_response(409, f"task {job.id} already finished: it is {job.status}", **job.as_json())
        caller = caller_of(request.scope)
        logger.info("SVD job %s canceled by request%s", job.id, f" of {caller.name}" if caller.name else "")
        return JSONResponse(job.as_json())

    async def retry(self, request: Request) -> Response:
        job = await self._job(request)
        if isinstance(job, Response):
            return job
        if job.status not in FINISHED:
            return error_response(400, f"task {job.id} is not finished yet: it is {job.status}", status=job.status)
        kept = await run_in_threadpool(self.store.input, job.id)
        if kept is None:
            return error_response(404, f"the input of task {job.id} is no longer kept; submit it again")
        # The new job is the first one's owner's, whoever asks for it (the admin may).
        return _accepted(await self._queue(job.owner, *kept))

    async def preview(self, request: Request) -> Response:
        """The latest preview of a running job (svd/storage/previews.py), from the storage every replica shares."""
        job = await self._job(request)
        if isinstance(job, Response):
            return job
        job_id = job.id
        # Read whole, not streamed from the path: the next preview may replace the file meanwhile.
        image = await run_in_threadpool(self.previews.read, job_id)
        if image is None:
            return error_response(
                404,
                f"task {job_id} has no preview now: a running job has one from its first denoising steps "
                "until its video is made",
            )
        return Response(image, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})

    async def _job(self, request: Request) -> Job | Response:
        """The job the query's task_id names, or the response that says why there is none: another
        user's job is answered as one that does not exist."""
        job_id = _task_id(request)
        if isinstance(job_id, Response):
            return job_id
        job = await run_in_threadpool(self.store.get, job_id)
        if job is None:
            # The store forgets finished jobs after a day; their videos are kept longer.
            record = await run_in_threadpool(self.outputs.record, job_id)
            if record is None:
                return _unknown(job_id)
            created = datetime.fromisoformat(record["created"]).timestamp()
            job = Job(job_id, COMPLETED, created, created, created, owner=record.get("owner", NOBODY))
        return job if caller_of(request.scope).sees(job.owner) else _unknown(job_id)


class EventStreamResponse:
    """An ASGI response that sends `events` as text/event-stream and stops them when the client goes away."""

    def __init__(self, events: AsyncIterator[bytes]):
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        metrics.EVENT_STREAMS.inc()
        try:
            async with anyio.create_task_group() as group:

                async def until_gone() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(until_gone)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", f"{EVENTS_TYPE}; charset=utf-8".encode()),
                            (b"cache-control", b"no-store"),
                            # Proxies such as nginx would hold the events back in their buffers.
                            (b"x-accel-buffering", b"no"),
                        ],
                    }
                )
                async for chunk in self.events:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()
        finally:
            metrics.EVENT_STREAMS.dec()


def no_such_task(job_id: str) -> tuple[int, str]:
    """The status and message for a task id that names no job: 400 when it is no id at all."""
    if not ID.fullmatch(job_id):
        return 400, f"not a task id: ids are 32 hex digits, got {job_id[:80]!r}"
    return 404, f"no task {job_id}: never submitted here, or finished more than a day ago and its video pruned"


def _task_id(request: Request) -> str | Response:
    job_id = request.query_params.get("task_id")
    if job_id is None:
        return error_response(400, "task_id is required: ?task_id=<the id /generate_task/submit answered>")
    return job_id if ID.fullmatch(job_id) else _unknown(job_id)


def _accepted(job: Job | Response) -> Response:
    return job if isinstance(job, Response) else JSONResponse({"task_id": job.id, "status": job.status})


def _unknown(job_id: str) -> JSONResponse:
    return error_response(*no_such_task(job_id))


def _idempotency(caller: Caller, key: str, image: bytes, controls: dict[str, Any], hook: Webhook | None) -> Idempotency:
    """The key scoped to the caller, and a digest of what it asks for."""
    asked = hashlib.sha256(image)
    asked.update(json.dumps([controls, hook and [hook.url, hook.events]], sort_keys=True).encode())
    return Idempotency(f"{caller.name}:{key}", asked.hexdigest())


def _decoded(value: Any) -> Any:
    """A form field as BentoML reads one: JSON when it parses (`null`, `42`), else its text."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _check_image(image: bytes, max_pixels: int) -> None:
    """Refuse at submit what the job would fail on: not an image, too large, too small, truncated."""
    from svd.media.images import open_image

    with tempfile.NamedTemporaryFile() as file:
        file.write(image)
        file.flush()
        open_image(Path(file.name), max_pixels).close()
