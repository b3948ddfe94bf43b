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
