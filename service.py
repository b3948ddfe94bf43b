"""Stable Video Diffusion XT as a BentoML service: a still image in, a short video out.

Serve it with `bentoml serve` and open http://localhost:3000 for the Swagger UI.
Configuration is read from the environment once, in svd/config.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import bentoml
from bentoml.validators import ContentType
from pydantic import Field
from starlette.responses import Response

from svd.config import ConfigError, Settings
from svd.errors import Refused
from svd.fields import GenerateInput
from svd.guards import BearerAuth, UploadGuard
from svd.hub import hub_reference
from svd.library import library_app
from svd.outputs import DiskFull, Outputs, new_id, record_of
from svd.params import GenerationParams
from svd.ui import PUBLIC_FILES, ui_app

if TYPE_CHECKING:
    from svd.generate import Generation

logger = logging.getLogger("bentoml.svd")
try:
    SETTINGS = Settings.from_env()
except ConfigError as exc:
    # One paragraph and a non-zero exit, not a traceback through BentoML's loader.
    raise SystemExit(f"SVD cannot start: {exc}") from None

UI_PATH = "/ui"
# Where every video is kept (SVD_OUTPUT_DIR); None when set empty.
OUTPUTS = Outputs(Path(SETTINGS.output_dir), SETTINGS.output_keep) if SETTINGS.output_dir else None

DESCRIPTION = """\
Turns a still image into a short video with [Stable Video Diffusion XT](https://huggingface.co/stabilityai/stable-video-diffusion-img2vid-xt):
25 frames at 1024x576 by default, as MP4 (H.264, plays everywhere), WebM or GIF.

It needs an NVIDIA GPU with 16 GB of memory or more; a default video takes 30 s to a few minutes.
**[Open the web page](/ui/)** to try it in the browser.

- `POST /generate` answers the video itself. `POST /generate_task/submit` starts the same
  generation as a job: follow it with `/generate_task/status` and `POST /progress`, and fetch
  it with `/generate_task/get`.
- Every video comes with `X-Seed` (the seed used: send it back to get the same frames),
  `X-Settings` (every effective setting, as JSON), `Server-Timing` (milliseconds per stage),
  `X-Worker` and `X-Output-Id`: the video stays available at `GET /outputs/<id>`, and
  `GET /outputs/` lists the recent ones.
- `interpolate`, `segments` and `loop` make smoother, longer and looping videos.
- A refusal is JSON with an `error` that says what was wrong and what is allowed: 400 for a bad
  field or an unknown one, 401 without the API token when one is set, 408 for a stalled upload,
  413 and 415 for the image, 429 and 503 with `Retry-After` when busy or loading, 504 past the
  time limit, 507 when the output disk is full.
- `/livez` and `/readyz` are the probes: `/readyz` answers 200 once the model is loaded and warm.
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
    # One worker per GPU (SVD_WORKERS), each with its own model and queue.
    resources={"gpu": SETTINGS.workers, "gpu_type": "nvidia-l4"},
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
        from bentoml._internal.configuration.containers import BentoMLContainer

        from svd.engine import Engine

        settings = replace(SETTINGS, worker=bentoml.server_context.worker_index or 1)
        # Beside BentoML's task results, which every worker shares too.
        progress = Path(BentoMLContainer.result_store_file.get()).with_name("svd_progress.db")
        # Loads and warms up in the background: /livez answers at once, /readyz once warm.
        self.engine = Engine(settings, (lambda: self.hub_model) if self.hub_model else None, progress)

    def __is_ready__(self) -> bool:
        return self.engine.ready

    def __is_alive__(self) -> bool:
        return self.engine.alive

    @bentoml.api(input_spec=GenerateInput)
    def generate(self, context: bentoml.Context, image: Path, **controls: Any) -> Annotated[Path, ContentType("video/*")]:
        """Turn a still image into a short video (25 frames at 1024x576 by default).

        The seed actually used comes back in the X-Seed header, every effective
        setting in X-Settings, and the milliseconds per stage in Server-Timing.
        """
        params = GenerationParams(**controls)
        task_id = getattr(context.request.state, "task_id", None)
        output_id = task_id or new_id()
        try:
            result = self.engine.run(image, params, Path(context.temp_dir), key=task_id)
            keep(output_id, result, image, self.engine.settings)
        except Refused as refused:
            # BentoML answers with the context's status code, whatever the response says.
            context.response.status_code = refused.status
            return refused.response()  # type: ignore[return-value]
        headers = {**response_headers(result), "X-Worker": str(self.engine.settings.worker), "X-Output-Id": output_id}
        if task_id is not None:
            # BentoML stores a job's answer by replaying the response without a
            # request method, which a file response needs: hand it the bytes.
            return Response(result.path.read_bytes(), headers=headers)  # type: ignore[return-value]
        context.response.headers.update(headers)
        return result.path

    # The same generation as an async job: POST /generate_task/submit answers a
    # task id at once; /generate_task/status and /generate_task/get follow it.
    generate_task = bentoml.task(generate.func, route="/generate_task", input_spec=GenerateInput)
    generate_task.name = "generate_task"  # bentoml.task ignores its name argument (1.4.39)

    @bentoml.api
    async def progress(
        self, task_id: Annotated[str, Field(description="The id /generate_task/submit answered.")]
    ) -> dict[str, Any]:
        """Where a generate_task job is: its stage (queued, encode, denoise, decode, interpolate, video, done),
        its step and its segment."""
        progress = self.engine.progress(task_id)
        if progress is None:
            return {"task_id": task_id, "stage": "unknown", "step": 0, "steps": 0}
        return {"task_id": task_id, **progress.__dict__}


if OUTPUTS:
    StableDiffusionVideo.mount_asgi_app(library_app(OUTPUTS), path="/outputs")

# The first added runs first: check the token before reading any upload.
if SETTINGS.api_token:
    StableDiffusionVideo.add_asgi_middleware(
        BearerAuth,
        token=SETTINGS.api_token,
        pages=frozenset({UI_PATH, f"{UI_PATH}/", f"{UI_PATH}/index.html"}),
        public=frozenset(f"{UI_PATH}/{name}" for name in PUBLIC_FILES),
    )
StableDiffusionVideo.add_asgi_middleware(
    UploadGuard,
    max_bytes=SETTINGS.max_upload_bytes,
    timeout=SETTINGS.upload_timeout,
    # Each POST route's fields, as the signatures above declare them; a task is submitted at ROUTE/submit.
    fields={
        f"{api.route}/submit" if api.is_task else api.route: list(api.input_spec.model_fields)
        for api in StableDiffusionVideo.apis.values()
    },
)


def keep(output_id: str, result: Generation, image: Path, settings: Settings) -> None:
    """Keep the video and its record in SVD_OUTPUT_DIR; a full disk is a 507, with nothing kept."""
    if OUTPUTS is None:
        return
    try:
        OUTPUTS.save(output_id, result.path, record_of(result, image, settings))
    except DiskFull as full:
        logger.error("SVD could not keep output %s: %s", output_id, full.strerror)
        raise Refused(HTTPStatus.INSUFFICIENT_STORAGE, "disk_full", f"{full.strerror}; nothing was kept") from None


def response_headers(result: Generation) -> dict[str, str]:
    """What a caller needs to reproduce or report a result, without guessing defaults."""
    return {
        "Content-Type": result.content_type,
        "X-Seed": str(result.params.seed),
        "X-Settings": json.dumps(result.params.__dict__, separators=(",", ":")),
        "Server-Timing": result.times.server_timing(),
    }
