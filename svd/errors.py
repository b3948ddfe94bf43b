"""Errors a caller can act on, each with the HTTP status BentoML answers with."""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException, InvalidArgument


class BadInput(InvalidArgument):
    """400: the request is wrong; the message says what is allowed."""


class TooLarge(BentoMLException):
    """413: the upload or the image is bigger than the service accepts."""

    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UnsupportedImage(BentoMLException):
    """415: the upload is not an image format the service reads."""

    error_code = HTTPStatus.UNSUPPORTED_MEDIA_TYPE


class Refused(Exception):
    """The service cannot take the request now; answered with a Retry-After where retrying helps.

    BentoML's own error responses carry no headers, so these become responses here.
    """

    def __init__(self, status: HTTPStatus, reason: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    def response(self):  # -> starlette.responses.JSONResponse
        from starlette.responses import JSONResponse

        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse({"error": str(self)}, status_code=self.status, headers=headers)
