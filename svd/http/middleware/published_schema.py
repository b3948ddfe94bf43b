"""The API schema at /docs.json, telling what the service really does.

BentoML publishes each route with 400, 404 and 500 and lets unknown fields through in
the schema, while the service refuses unknown fields and answers the statuses below.
Generated clients and fuzzers read the schema as a contract, so it is rewritten once:
required and closed input objects, the task id's form, and each route's real statuses
with the JSON every refusal has.
"""

from __future__ import annotations

import copy
from typing import Any

from starlette.responses import JSONResponse

from svd.base.ids import ID
from svd.http.asgi import App, Receive, Scope, Send
from svd.jobs.model import CANCELED, COMPLETED, FAILED, IN_PROGRESS, PENDING

ERROR_SCHEMA = {
    "type": "object",
    "title": "Error",
    "required": ["error"],
    "properties": {"error": {"type": "string", "description": "What was wrong, and what is allowed."}},
}
WHY = {
    400: "A field is missing, unknown, out of range or of the wrong type; the body does not parse as its content type.",
    401: "API tokens are set (SVD_API_TOKENS, SVD_API_TOKEN) and `Authorization: Bearer <token>` is missing or wrong.",
    404: "No job of yours has this task id; for /generate_task/preview, the job has no preview now.",
    408: "The upload did not arrive whole within SVD_UPLOAD_TIMEOUT.",
    409: "The job already finished (cancel), or was cancelled (get).",
    413: "The upload or the image is too large.",
    415: "The file is not an image format the service reads.",
    422: "The request needs more GPU memory than the GPU has.",
    429: "Too many generations or jobs waiting, in all or yours (SVD_MAX_QUEUE_PER_USER); retry after Retry-After "
    "seconds.",
    500: "The job failed: its worker stopped SVD_JOB_ATTEMPTS times, or the generation failed.",
    503: "The model is loading, the GPU is out of memory or failed, or the job queue or output bucket is unreachable.",
    504: "The generation passed SVD_TIMEOUT.",
    507: "The disk or bucket of SVD_OUTPUT_DIR is full.",
}
RETRY_AFTER = {429, 503}
GENERATES = (400, 408, 413, 415, 422, 429, 503, 504, 507)
# What each route answers besides 200.
STATUSES: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/generate"): GENERATES,
    ("post", "/generate_task"): GENERATES,
    ("post", "/generate_task/submit"): (400, 408, 413, 415, 429, 503),
    ("get", "/generate_task/status"): (400, 404, 503),
    # A failed job's get answers the status its generation failed with.
    ("get", "/generate_task/get"): (400, 404, 409, 413, 415, 422, 500, 503, 504, 507),
    ("put", "/generate_task/cancel"): (400, 404, 409, 503),
    ("post", "/generate_task/retry"): (400, 404, 429, 503),
    ("post", "/progress"): (400, 404, 408, 413, 503),
    ("get", "/generate_task/preview"): (400, 404),
    ("get", "/livez"): (503,),
    ("get", "/readyz"): (503,),
}
_TIME = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}
# BentoML's lists other words than the ones its task store and clients use.
TASK_STATUS = {
    "type": "object",
    "title": "TaskStatusResponse",
    "required": ["task_id", "status", "created_at", "executed_at", "completed_at", "attempt", "error"],
    "properties": {
        "task_id": {"type": "string"},
        "status": {"enum": [PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELED], "type": "string"},
        "created_at": _TIME,
        "executed_at": {**_TIME, "description": "When the job's latest attempt started."},
        "completed_at": _TIME,
        "attempt": {
            "type": "integer",
            "minimum": 0,
            "description": "Starts so far: more than 1 after its worker died.",
        },
        "error": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "Why a failed job failed."},
    },
}
TASK_ID = {"type": "string", "pattern": f"^{ID.pattern}$", "description": "The id /generate_task/submit answered."}
# Answered by svd/http/task_routes.py, not by a BentoML API, so BentoML's spec does not have it.
PREVIEW_PATH = "/generate_task/preview"
PREVIEW = {
    "get": {
        "tags": ["Service APIs"],
        "operationId": "StableDiffusionVideo__generate_task_preview",
        "description": "The latest live preview of a running generate_task job: every frame, one pixel per latent, "
        "as an animated WebP. POST /progress answers its address as `preview`; the address changes with each new one.",
        "parameters": [
            {"name": "task_id", "in": "query", "required": True, "schema": {"type": "string"}},
            {
                "name": "v",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "Which preview /progress named; the latest is served whatever it says.",
            },
        ],
        "responses": {
            "200": {
                "description": "The preview.",
                "content": {"image/webp": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    }
}


def published(
    spec: dict[str, Any], job_fields: dict[str, Any], open_paths: frozenset[str], token: bool
) -> dict[str, Any]:
    """BentoML's `spec`, told the truth; `job_fields`: what /generate_task/submit takes beyond
    /generate's fields; `token`: API tokens guard all but `open_paths`."""
    spec = copy.deepcopy(spec)
    spec["paths"].setdefault(PREVIEW_PATH, copy.deepcopy(PREVIEW))
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                # Every route that reads a body needs one.
                operation["requestBody"]["required"] = True
                for media in operation["requestBody"]["content"].values():
                    target = _close(media["schema"], schemas)
                    if (method, path) == ("post", "/generate_task/submit"):
                        # BentoML declares the generation's fields; a job takes these too.
                        target["properties"].update(job_fields)
            for parameter in operation.get("parameters", []):
                if parameter.get("name") == "task_id":
                    parameter["schema"] = dict(TASK_ID)
            statuses = STATUSES.get((method, path))
            if statuses is None:
                continue
            if token and path not in open_paths:
                statuses = tuple(sorted({*statuses, 401}))
            # BentoML's keys are numbers until serialised.
            ok = next(answer for code, answer in operation["responses"].items() if str(code) == "200")
            operation["responses"] = {"200": ok, **{str(code): _refusal(code) for code in statuses}}
    schemas["Error"] = ERROR_SCHEMA
    schemas["TaskStatusResponse"] = TASK_STATUS
    for unused in ("InvalidArgument", "NotFound", "InternalServerError"):
        schemas.pop(unused, None)
    return spec


def _close(schema: dict[str, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    """The service refuses fields a route does not take: say so. The object schema closed."""
    target = schemas[schema["$ref"].rsplit("/", 1)[-1]] if "$ref" in schema else schema
    if target.get("type") == "object":
        target["additionalProperties"] = False
        if "task_id" in target.get("properties", {}):
            target["properties"]["task_id"] = dict(TASK_ID)
    return target


def _refusal(code: int) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": WHY[code],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if code in RETRY_AFTER:
        response["headers"] = {
            "Retry-After": {
                "description": "Seconds to wait before retrying, where retrying helps.",
                "schema": {"type": "integer"},
            }
        }
    return response


class PublishedSchema:
    """Answers GET /docs.json with `published(spec())`, made at the first request."""

    def __init__(self, app: App, spec: Any, job_fields: dict[str, Any], open_paths: frozenset[str], token: bool):
        self.app = app
        self.spec = spec
        self.job_fields = job_fields
        self.open_paths = open_paths
        self.token = token
        self._published: dict[str, Any] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != "/docs.json":
            await self.app(scope, receive, send)
            return
        if self._published is None:
            self._published = published(self.spec(), self.job_fields, self.open_paths, self.token)
        await JSONResponse(self._published)(scope, receive, send)
