"""Bearer-token access: the named users (SVD_API_TOKENS) and the admin (SVD_API_TOKEN), leaving the
probes and /metrics open. Each request that passes carries its caller in its scope (caller_of)."""

from __future__ import annotations

import hmac
import re

from svd.base.users import ADMIN, OPEN, Caller
from svd.http.answers import refuse
from svd.http.asgi import App, Receive, Scope, Send

OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
# Where a request's caller is kept in its ASGI scope.
CALLER = "svd.caller"


def caller_of(scope: Scope) -> Caller:
    """Who sent the request; everyone is the admin where no token is set."""
    return scope.get(CALLER, OPEN)


class BearerAuth:
    """Every route but the probes and /metrics needs `Authorization: Bearer <token>`: a user's from
    `users` (name -> token), or the `admin`'s.

    Loads of the `pages` (GET) may carry it as `?token=` instead, since a browser
    cannot set a header on a navigation; nothing else takes it there, so it is in
    no address but the page's. GETs of `public` paths (the page's script and
    style, which the browser loads without either) need nothing.
    """

    def __init__(
        self,
        app: App,
        admin: str,
        users: dict[str, str],
        pages: frozenset[str] = frozenset(),
        public: frozenset[str] = frozenset(),
    ):
        self.app = app
        self.pages = pages
        self.public = public
        self.callers = [(token.encode(), Caller(name)) for name, token in users.items()]
        if admin:
            self.callers.append((admin.encode(), Caller(ADMIN, admin=True)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        caller = self._caller(scope)
        if caller is not None:
            scope[CALLER] = caller
            await self.app(scope, receive, send)
            return
        await refuse(
            scope, receive, send, 401, "unauthorized",
            "missing or wrong API token: send `Authorization: Bearer <token>` with your token (SVD_API_TOKENS) "
            "or the admin's (SVD_API_TOKEN)",
            **{"WWW-Authenticate": "Bearer"},
        )

    def _caller(self, scope: Scope) -> Caller | None:
        """The caller whose token the request carries; the public files' caller is nobody in particular."""
        header = dict(scope["headers"]).get(b"authorization", b"")
        token = header[len(b"Bearer "):] if header[: len(b"Bearer ")].lower() == b"bearer " else None
        if token is None and scope["method"] == "GET" and scope["path"] in self.pages:
            query = re.search(rb"(?:^|&)token=([^&]*)", scope.get("query_string", b""))
            token = query.group(1) if query else None
        if token is not None:
            # Compared with every token, in constant time each: how long it takes says nothing of which matched.
            found = [caller for known, caller in self.callers if hmac.compare_digest(token, known)]
            if found:
                return found[0]
        if scope["method"] == "GET" and scope["path"] in self.public:
            return Caller("")
        return None
