"""`X-Served-By` on every response: the worker that answered, whichever route, refusals included.

With several workers (SVD_WORKERS) a job is run by one and followed through any; this
says which one a client, a log or a test is looking at. `X-Worker` on a video says which
worker made it.
"""

from __future__ import annotations

from collections.abc import Callable

from svd.http.asgi import App, Message, Receive, Scope, Send


class ServedBy:
    """`worker` says which worker this is; it is asked in the worker, where the middleware is built."""

    def __init__(self, app: App, worker: Callable[[], int]):
        self.app = app
        self.header = (b"x-served-by", str(worker()).encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, sending)
