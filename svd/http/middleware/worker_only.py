"""A GPU worker's door (SVD_ROLE=worker): its probes and its metrics, nothing of the public API.

Workers take their jobs from the shared queue; the api replicas take the requests. A request
that reaches a worker anyway (a Service pointed at the wrong pods) is told where to go instead
of being run beside the queue's jobs.
"""

from __future__ import annotations

from svd.http.answers import error_response
from svd.http.asgi import App, Receive, Scope, Send

WORKER_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


class WorkerOnly:
    def __init__(self, app: App):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in WORKER_PATHS:
            await self.app(scope, receive, send)
            return
        await error_response(
            404,
            f"{scope['path']} is not served here: this replica is a GPU worker (SVD_ROLE=worker), which takes "
            "jobs from the queue and answers only /livez, /readyz and /metrics; send requests to the api "
            "replicas (SVD_ROLE=api)",
        )(scope, receive, send)
