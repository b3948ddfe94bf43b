"""ASGI middleware that turns uploads away before BentoML parses them.

- An upload limit (SVD_MAX_UPLOAD_BYTES): 413 from the Content-Length header, or
  as soon as a streamed body passes it, before anything is decoded; and a time limit
  (SVD_UPLOAD_TIMEOUT): 408 for a body that stalls or dribbles.
- `image` must be an uploaded file: BentoML would otherwise download a URL sent
  in its place, from the server, to anywhere.
- Only the fields a route accepts: BentoML ignores the others, so a misspelt
  `motion_bucket=3` would cost minutes of GPU for a video made with the defaults.

The token check is svd/http/middleware/auth.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from urllib.parse import parse_qs

from starlette.datastructures import UploadFile
from starlette.requests import Request

from svd.http.answers import refuse
from svd.http.asgi import App, Message, Receive, Scope, Send

FILE_FIELDS = ("image",)
BOUNDARY = re.compile(rb"boundary=\"?([^\";]+)", re.IGNORECASE)
# BentoML keeps an upload as tmpXXXXXXXX<its file name>, and file systems take 255 bytes in one
# name: a longer one failed with a 500.
MAX_FILENAME_BYTES = 200


class UploadGuard:
    """Refuses bodies above the limit (413), `image` fields that are not files (400), and
    fields the route does not accept (400); `fields` maps each POST route to its fields."""

    def __init__(self, app: App, max_bytes: int, fields: dict[str, list[str]], timeout: float = 60):
        self.app = app
        self.max_bytes = max_bytes
        self.fields = fields
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        body = bytearray()
        more = True
        deadline = time.monotonic() + self.timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                await refuse(
                    scope, receive, send, 408, "upload_timeout",
                    f"the upload did not arrive whole within {self.timeout:g} s (SVD_UPLOAD_TIMEOUT); "
                    f"{len(body)} bytes came",
                )
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
        content_type = headers.get(b"content-type", b"")
        if content_type.lower().startswith(b"multipart/form-data") and not BOUNDARY.search(content_type):
            # BentoML's parser would fail on it with a 500.
            await refuse(
                scope, receive, send, 400, "bad_upload",
                "Content-Type multipart/form-data needs its boundary (multipart/form-data; boundary=...): "
                "send the body as a form upload, as curl -F or a browser does.",
            )
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        try:
            sent = await _sent_fields(scope, bytes(body), content_type)
        except _Unreadable as exc:
            # BentoML's parser would fail on it too, with a 500.
            await refuse(scope, receive, send, 400, "bad_upload", str(exc))
            return
        if problem := _problem(sent):
            await refuse(scope, receive, send, 400, "bad_upload", problem)
            return
        if field := next((name for name, filename in sent if name in FILE_FIELDS and filename is None), None):
            await refuse(
                scope, receive, send, 400, "url_not_file",
                f"`{field}` must be an uploaded file (a multipart file part with a filename); this "
                "service never downloads URLs: fetch the image yourself and upload it.",
            )
            return
        accepted = self.fields.get(scope["path"])
        if accepted and (unknown := [name for name, _ in sent if name not in accepted]):
            await refuse(
                scope, receive, send, 400, "unknown_field",
                f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(f'`{name}`' for name in unknown)}; "
                f"{scope['path']} accepts: {', '.join(accepted)}.",
            )
            return
        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        await refuse(
            scope, receive, send, 413, "too_large",
            f"the upload is larger than {self.max_bytes / 1e6:g} MB (SVD_MAX_UPLOAD_BYTES); send a smaller image",
        )


class _Unreadable(ValueError):
    """The body does not parse as the content type it declares."""


def _problem(sent: list[tuple[str, str | None]]) -> str | None:
    """What is wrong with the fields themselves, before their values are looked at."""
    if twice := sorted(name for name, count in Counter(name for name, _ in sent).items() if count > 1):
        return f"{', '.join(f'`{name}`' for name in twice)} sent more than once; send each field once."
    for name, filename in sent:
        basename = None if filename is None else filename.rsplit("/", 1)[-1].encode()  # as os.path.basename
        if basename is not None and len(basename) > MAX_FILENAME_BYTES:
            return (
                f"the file name of `{name}` is {len(basename)} bytes long; the limit is {MAX_FILENAME_BYTES}: "
                "rename the file."
            )
    return None


async def _sent_fields(scope: Scope, body: bytes, content_type: bytes) -> list[tuple[str, str | None]]:
    """The name of each field a form or JSON body sends, and the file name of an uploaded file;
    _Unreadable when a form does not parse."""
    if content_type.startswith(b"application/x-www-form-urlencoded"):
        return [(name, None) for name in parse_qs(body.decode("latin-1"), keep_blank_values=True)]
    if content_type.startswith(b"application/json"):
        try:
            sent = json.loads(body)
        except ValueError:
            return []  # BentoML answers what is wrong with it
        return [(str(name), None) for name in sent] if isinstance(sent, dict) else []
    if not content_type.lower().startswith(b"multipart/form-data"):
        return []

    async def whole_body() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    # Parsed as BentoML will parse it (Starlette's parser), so that what fails here would fail there.
    try:
        form = await Request(scope, whole_body).form()
    except Exception as exc:  # python-multipart and Starlette raise several kinds for a body that does not parse
        why = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
        raise _Unreadable(
            f"the body could not be read as multipart/form-data ({why}): send it as a form upload, as curl -F or "
            "a browser does."
        ) from None
    try:
        return [(name, value.filename if isinstance(value, UploadFile) else None) for name, value in form.multi_items()]
    finally:
        await form.close()
