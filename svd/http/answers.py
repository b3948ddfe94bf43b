"""The one place a refusal becomes an HTTP answer: JSON with an `error` that says what was
wrong, the refusal's status, and Retry-After where retrying helps.

service.py, the task routes and the middleware all answer through here, so every refusal
has the same form.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

from svd.base.errors import Refused
from svd.http.asgi import Receive, Scope, Send
from svd.serving import metrics
from svd.storage.outputs import UNAVAILABLE_RETRY_AFTER
from svd.storage.storage import StorageUnavailable


def error_response(code: int, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    """`{..extra, "error": message}` with the status `code` and `headers`; `extra` may hold a `status`."""
    return JSONResponse({**extra, "error": message}, status_code=code, headers=headers)


def answer(refused: Refused) -> JSONResponse:
    """A Refused as the service answers it."""
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else None
    return error_response(refused.status, str(refused), headers)


async def refuse(
    scope: Scope, receive: Receive, send: Send, status: int, reason: str, message: str, **headers: str
) -> None:
    """Answer a request the middleware turns away, counted by `reason` in svd_requests_refused."""
    metrics.REFUSED.labels(reason=reason).inc()
    await error_response(status, message, headers or None)(scope, receive, send)


def unavailable(down: StorageUnavailable) -> JSONResponse:
    """503 for the output store unreachable: the message names it, never its credentials."""
    return error_response(503, down.strerror, headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})
