"""Errors a caller can act on, each with the HTTP status the service answers it with.

The generation core raises them without knowing about HTTP servers; the service
edge (svd/http/answers.py) turns them into responses. Pure data: no web framework here.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any


class InputError(ValueError):
    """The request cannot be served as sent; the message says what is allowed."""

    status = HTTPStatus.BAD_REQUEST


class BadInput(InputError):
    """400: the request is wrong."""


class TooLarge(InputError):
    """413: the upload or the image is bigger than the service accepts."""

    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedImage(InputError):
    """415: the upload is not an image format the service reads."""

    status = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Refused(Exception):
    """The service answers the request with this status and message instead of a video,
    with a Retry-After where retrying helps.

    BentoML's own error responses carry no headers, so svd/http/answers.py makes the
    response: `reason` is the refusal's code (for metrics), `retry_after` its Retry-After.
    """

    def __init__(self, status: HTTPStatus, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after


def validation_message(errors: list[dict[str, Any]]) -> str:
    """Pydantic's errors as one line that names each field and what was wrong with it."""
    return "; ".join(
        f"{'.'.join(map(str, error.get('loc', ()))) or 'the body'}: "
        f"{str(error.get('msg')).removeprefix('Value error, ')}"
        for error in errors
    )
