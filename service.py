"""Stable Video Diffusion XT as a BentoML service: a still image in, a short video out.

Serve it with `bentoml serve` and open http://localhost:3000 for the Swagger UI.
Configuration is read from the environment once, in svd/base/settings.py. This file is the
only place that wires the layers of svd/ together (README: Files).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import Field
from starlette.responses import Response

from svd.base.errors import Refused
from svd.base.ids import ID, new_id
from svd.base.params import GenerationParams
from svd.base.settings import ConfigError, Settings
from svd.http.answers import answer
from svd.http.middleware.auth import OPEN_PATHS, BearerAuth, caller_of
from svd.http.middleware.published_schema import PublishedSchema
from svd.http.middleware.readable_refusals import ReadableRefusals
from svd.http.middleware.served_by import ServedBy
from svd.http.middleware.upload_guard import UploadGuard
from svd.http.middleware.worker_only import WorkerOnly
from svd.http.outputs_routes import library_app
from svd.http.page import PUBLIC_FILES, ui_app
from svd.http.request_fields import JOB_ONLY, GenerateInput, JobInput
from svd.http.task_routes import UNAVAILABLE_RETRY_AFTER, JobRoutes, no_such_task
from svd.jobs.following import QueuePlaces, progress_of
from svd.jobs.model import StoreUnavailable
from svd.jobs.open import open_store
from svd.jobs.webhooks.addresses import WebhookHosts
from svd.serving.hub import hub_reference
from svd.serving.records import headers_of, record_of
from svd.storage.open import storage_at
from svd.storage.outputs import Outputs
from svd.storage.previews import previews_of

try:
    SETTINGS = Settings.from_env()
except ConfigError as exc:
    # One paragraph and a non-zero exit, not a traceback through BentoML's loader.
    raise SystemExit(f"SVD cannot start: {exc}") from None

logger = logging.getLogger(f"bentoml.{__name__}")
UI_PATH = "/ui"
# Where every video is kept (SVD_OUTPUT_DIR, a folder or a bucket); None when set empty.
OUTPUTS = (
    Outputs(storage_at(SETTINGS.output_dir, SETTINGS.output_region), SETTINGS.output_keep)
    if SETTINGS.output_dir
    else None
)
# A job's video waits there for its client, or beside the job store when videos are not kept.
JOB_OUTPUTS = OUTPUTS or Outputs(Path(SETTINGS.jobs_db).parent, SETTINGS.output_keep)
# The running jobs' live previews, beside their videos.
JOB_PREVIEWS = previews_of(JOB_OUTPUTS)
# Webhook URLs the service calls; None: it sends none (SVD_WEBHOOK_SECRET unset).
WEBHOOK_HOSTS = WebhookHosts.parse(SETTINGS.webhook_hosts) if SETTINGS.webhook_secret else None
# The named users (SVD_API_TOKENS), name -> token; with the admin's token (SVD_API_TOKEN) or none, the service is
# open to whoever holds one.
USERS = dict(SETTINGS.api_tokens)

DESCRIPTION = """\
Turns a still image into a short video with [Stable Video Diffusion XT](https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt):
25 frames at 1024x576 by default, as MP4 (H.264, plays everywhere), WebM or GIF.

It needs an NVIDIA GPU with 16 GB of memory or more; a default video takes 30 s to a few minutes.
**[Open the web page](/ui/)** to try it in the browser.

- `POST /generate` answers the video itself. `POST /generate_task/submit` queues the same
  generation as a job: follow it with `/generate_task/status` and `POST /progress` (which
  also points to a live preview of the video being made), fetch
  it with `/generate_task/get`, stop it with `PUT /generate_task/cancel`. Jobs survive
  restarts and crashes: a job whose worker dies is run again by another.
- Every video comes with `X-Seed` (the seed used: send it back to get the same frames),
  `X-Settings` (every effective setting, as JSON), `Server-Timing` (milliseconds per stage),
  `X-Worker` and `X-Output-Id`: the video stays available at `GET /outputs/<id>`, and
  `GET /outputs/` lists the recent ones.
- `interpolate`, `segments` and `loop` make smoother, longer and looping videos.
- With API tokens set, each user sees only their own jobs and videos (another's answer 404), and
  the GPU takes the next job of the user who has had the least GPU time lately.
- A refusal is JSON with an `error` that says what was wrong and what is allowed: 400 for a bad
  field or an unknown one, 401 without an API token when they are set, 408 for a stalled upload,
  413 and 415 for the image, 429 and 503 with `Retry-After` when busy or loading, 504 past the
  time limit, 507 when the output disk or bucket is full.
- `/livez` and `/readyz` are the probes: `/readyz` answers 200 once the model is loaded and warm.
- Split deployments (SVD_ROLE): api replicas answer every route above without a GPU and queue the
  work for GPU workers, which may scale to zero; `/generate` then waits for a worker.
"""


class DescribedService(bentoml.Service):
    """Swagger's front page shows this service's description, not BentoML's boilerplate,
    also when served from source (a built Bento uses the description as its README)."""

    @property
    def doc(self) -> str:
        return self.description if self.bento is None and self.description else super().doc


@bentoml.service(
    description=DESCRIPTION,
    service_class=DescribedService,
    # One worker per GPU (SVD_WORKERS), each with its own model and queue; an api replica needs no GPU.
    resources={"cpu": "1"} if SETTINGS.role == "api" else {"gpu": SETTINGS.workers, "gpu_type": "nvidia-l4"},
    workers=SETTINGS.workers,
    traffic={"timeout": SETTINGS.timeout, "max_concurrency": SETTINGS.max_concurrency},
    # Enough threads that every admitted request reaches the engine, which
    # queues them for the GPU and answers 429 beyond SVD_MAX_QUEUE.
    threads=SETTINGS.max_concurrency,
)
@bentoml.asgi_app(ui_app, path=UI_PATH)
class StableDiffusionVideo:
    # Declared for the hub model only: a Bento then pins its revision and
    # `bentoml containerize` bakes the weights in. None for tiny or a local directory.
    hub_model = hub_reference(SETTINGS)

    def __init__(self) -> None:
        # Here, not above: `bentoml serve` imports this file in a process that never runs
        # the model, and torch, diffusers and transformers take seconds and hundreds of MiB.
        from svd.serving.parent_watch import end_with_parent
        from svd.serving.quiet_logs import quiet_library_noise

        if bentoml.server_context.worker_index is not None:
            end_with_parent()
        quiet_library_noise()  # before the imports below, which already warn

        settings = replace(SETTINGS, worker=bentoml.server_context.worker_index or 1)
        logger.info(JOB_OUTPUTS.describe())
        self.jobs = open_store(settings)
        self.places = QueuePlaces(lambda: self.jobs)
        self.engine = self.runner = self.deliverer = None
        # An api replica (SVD_ROLE=api) never imports torch: its requests wait in the queue for the GPU workers.
        if settings.role != "api":
            from svd.jobs.runner import JobRunner
            from svd.serving.engine import Engine

            # Loads and warms up in the background: /livez answers at once, /readyz once warm.
            self.engine = Engine(settings, (lambda: self.hub_model) if self.hub_model else None)
            # Takes jobs from the store whenever this worker's GPU is free.
            self.runner = JobRunner(self.engine, self.jobs, JOB_OUTPUTS, settings.job_lease)
            self.runner.start()
        if WEBHOOK_HOSTS is not None:
            from svd.jobs.webhooks.delivery import Deliverer

            # Sends the jobs' webhooks kept in the store, whichever worker's job they are.
            self.deliverer = Deliverer(self.jobs, settings.webhook_secret, WEBHOOK_HOSTS)
            self.deliverer.start()

    @bentoml.on_shutdown
    def finish_running_job(self) -> None:
        """On SIGTERM the job running here finishes, as a request in flight does, and no other starts;
        webhooks not yet sent wait in the store for the next worker."""
        if self.deliverer is not None:
            self.deliverer.stop()
        if self.runner is not None:
            self.runner.stop(SETTINGS.timeout)

    def __is_ready__(self) -> bool:
        # Not ready while the job store (Redis) is unreachable: a load balancer then sends
        # submits to replicas that can queue them.
        return (self.engine is None or self.engine.ready) and self.jobs.reachable()

    def __is_alive__(self) -> bool:
        return self.engine is None or self.engine.alive

    @bentoml.api(input_spec=GenerateInput)
    def generate(
        self, context: bentoml.Context, image: Path, **controls: Any
    ) -> Annotated[Path, ContentType("video/*")]:
        """Turn a still image into a short video (25 frames at 1024x576 by default).

        The seed actually used comes back in the X-Seed header, every effective
        setting in X-Settings, and the milliseconds per stage in Server-Timing.
        """
        # Never reached on an api replica (SVD_ROLE=api): JobRoutes queues the request as a job there.
        output_id = new_id()
        try:
            result = self.engine.run(image, GenerationParams(**controls), Path(context.temp_dir))
            record = record_of(result, image, self.engine.settings)
            if OUTPUTS:
                OUTPUTS.put(output_id, result.path, {**record, "owner": caller_of(context.request.scope).name})
        except Refused as refused:
            return refuse(context, refused)  # type: ignore[return-value]
        headers = headers_of(output_id, record)
        if OUTPUTS is None:
            del headers["X-Output-Id"]  # nothing was kept to point at
        context.response.headers.update(headers)
        return result.path

    # The same generation as a job. Swagger and BentoML's clients learn the task routes
    # (ROUTE/submit, /status, /get, /cancel, /retry) from this declaration; the job store
    # answers them (svd/http/task_routes.py) and the runners run the jobs.
    generate_task = bentoml.task(generate.func, route="/generate_task", input_spec=GenerateInput)
    generate_task.name = "generate_task"  # bentoml.task ignores its name argument (1.4.39)

    @bentoml.api
    def progress(
        self,
        context: bentoml.Context,
        task_id: Annotated[str, Field(description="The id /generate_task/submit answered.")],
    ) -> dict[str, Any]:
        """Where a generate_task job is: its status, its stage (queued, encode, denoise, decode, interpolate,
        video, done), its step and its segment, `preview`: where its latest live preview is served
        (an animated WebP; a new address for each new one) or null while it has none, `queue_position`
        (jobs waiting ahead of it; 0: it is next; null once it runs), `eta_seconds` (seconds until its
        video is ready, from this service's measured speed; null before it has one, while no GPU worker
        runs, or once the job ended), `waiting_for` ("worker" while no GPU worker runs: one must start;
        else null), and how it ended: `output_id` and `output_path`, or `error` and `error_status`.
        `GET /generate_task/events` streams the same as server-sent events."""
        try:
            job = self.jobs.get(task_id) if ID.fullmatch(task_id) else None
            # Another user's job is one that does not exist.
            if job is not None and caller_of(context.request.scope).sees(job.owner):
                return progress_of(job, self.places, JOB_PREVIEWS, StableDiffusionVideo.apis["generate_task"].route)
        except StoreUnavailable as exc:
            refused = Refused(HTTPStatus.SERVICE_UNAVAILABLE, "queue_unavailable", str(exc), UNAVAILABLE_RETRY_AFTER)
            return refuse(context, refused)  # type: ignore[return-value]
        status, why = no_such_task(task_id)
        return refuse(context, Refused(HTTPStatus(status), "unknown_task", why))  # type: ignore[return-value]


# Declaring a task makes BentoML ask BentoCloud for its external queue with a concurrency of 1
# (_bentoml_sdk/service/factory.py, Service.__attrs_post_init__): every request, status polls and
# submits included, would wait there behind a replica's one running generation. Jobs wait in the
# job store instead, and a replica takes as many requests as it admits (README: BentoCloud).
StableDiffusionVideo.config["traffic"].update(external_queue=False, concurrency=SETTINGS.max_concurrency)

if OUTPUTS:
    StableDiffusionVideo.mount_asgi_app(library_app(OUTPUTS), path="/outputs")

# The first added runs first: name the worker on every answer, then check the token before
# reading any upload.
StableDiffusionVideo.add_asgi_middleware(ServedBy, worker=lambda: bentoml.server_context.worker_index or 1)
StableDiffusionVideo.add_asgi_middleware(ReadableRefusals)
if SETTINGS.role == "worker":
    StableDiffusionVideo.add_asgi_middleware(WorkerOnly)
if SETTINGS.api_token or USERS:
    StableDiffusionVideo.add_asgi_middleware(
        BearerAuth,
        admin=SETTINGS.api_token,
        users=USERS,
        pages=frozenset({UI_PATH, f"{UI_PATH}/", f"{UI_PATH}/index.html"}),
        public=frozenset(f"{UI_PATH}/{name}" for name in PUBLIC_FILES),
    )
StableDiffusionVideo.add_asgi_middleware(
    UploadGuard,
    max_bytes=SETTINGS.max_upload_bytes,
    timeout=SETTINGS.upload_timeout,
    # Each POST route's fields, as the signatures above declare them; a task is submitted at ROUTE/submit.
    fields={
        f"{api.route}/submit" if api.is_task else api.route: [
            *api.input_spec.model_fields,
            *(JOB_ONLY if api.is_task else ()),
        ]
        for api in StableDiffusionVideo.apis.values()
    },
)
StableDiffusionVideo.add_asgi_middleware(
    JobRoutes,
    route=StableDiffusionVideo.apis["generate_task"].route,
    open_store=partial(open_store, SETTINGS),
    fields=JobInput,
    # SVD_MAX_QUEUE per worker taking jobs, as for synchronous requests, and SVD_MAX_QUEUE_PER_USER per user.
    per_worker=SETTINGS.max_queue,
    per_user=SETTINGS.max_queue_per_user,
    users=frozenset(USERS),
    outputs=JOB_OUTPUTS,
    max_pixels=SETTINGS.max_pixels,
    webhook_hosts=WEBHOOK_HOSTS,
    # Where no model runs, the synchronous route is a job that its request waits for.
    queued=(StableDiffusionVideo.apis["generate"].route, GenerateInput) if SETTINGS.role == "api" else None,
)

StableDiffusionVideo.add_asgi_middleware(
    PublishedSchema,
    spec=lambda: StableDiffusionVideo.openapi_spec.asdict(),
    job_fields={name: JobInput.model_json_schema()["properties"][name] for name in JOB_ONLY},
    open_paths=OPEN_PATHS,
    token=bool(SETTINGS.api_token or USERS),
)


def refuse(context: bentoml.Context, refused: Refused) -> Response:
    # BentoML answers with the context's status code, whatever the response says.
    context.response.status_code = refused.status
    return answer(refused)
