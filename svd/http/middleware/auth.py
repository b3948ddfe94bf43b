"""Bearer-token access (SVD_API_TOKEN), leaving the probes and /metrics open."""

from __future__ import annotations

import hmac
import re

from svd.http.answers import refuse
from svd.http.asgi import App, Receive, Scope, Send

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})


class BearerAuth:
    """Every route but the probes and /metrics needs `Authorization: Bearer <token>`.

    Loads of the `pages` (GET) may carry it as `?token=` instead, since a browser
    cannot set a header on a navigation; nothing else takes it there, so it is in
    no address but the page's. GETs of `public` paths (the page's script and
    style, which the browser loads without either) need nothing.
    """

    def __init__(self, app: App, token: str, pages: frozenset[str] = frozenset(), public: frozenset[str] = frozenset()):
        self.app = app
        self.pages = pages
        self.public = public
        self.expected = f"Bearer {token}".encode()
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        await refuse(
            scope, receive, send, 401, "unauthorized",
            "missing or wrong API token: send `Authorization: Bearer <token>` (SVD_API_TOKEN is set)",
            **{"WWW-Authenticate": "Bearer"},
        )

    def _authorised(self, scope: Scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(header, self.expected):
            return True
        if scope["method"] != "GET":
            return False
        if scope["path"] in self.public:
            return True
        if scope["path"] not in self.pages:
            return False
        query = re.search(rb"(?:^|&)token=([^&]*)", scope.get("query_string", b""))
        return bool(query) and hmac.compare_digest(query.group(1), self.token)
