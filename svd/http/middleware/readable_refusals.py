"""BentoML's validation refusals worded as every other refusal: the field, and what was wrong with it."""

from __future__ import annotations

import json

from svd.base.errors import validation_message
from svd.http.asgi import App, Message, Receive, Scope, Send


class ReadableRefusals:
    """BentoML answers a body that fails its validation with 400 and
    `{"error": "1 validation error for Input", "detail": [...]}`; the error then says which
    field and what was wrong, as every other refusal's does."""

    def __init__(self, app: App):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def rewrite(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] == 400:
                start = message  # held until the body says whether it is BentoML's
                return
            if start is None or message["type"] != "http.response.body":
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            content = _readable(bytes(body))
            headers = [(name, value) for name, value in start["headers"] if name.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(content)).encode())]})
            await send({"type": "http.response.body", "body": content})

        await self.app(scope, receive, rewrite)


def _readable(body: bytes) -> bytes:
    try:
        answer = json.loads(body)
    except ValueError:
        return body
    detail = answer.get("detail") if isinstance(answer, dict) else None
    if not isinstance(detail, list) or "validation error" not in str(answer.get("error")):
        return body
    errors = [error for error in detail if isinstance(error, dict)]
    return json.dumps({**answer, "error": validation_message(errors) or answer["error"]}).encode()
