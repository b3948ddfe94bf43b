"""The web page at /ui (placeholder: being built)."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route


async def page(_request) -> HTMLResponse:
    return HTMLResponse("<!doctype html><title>SVD-XT</title><p>Coming soon.</p>")


ui_app = Starlette(routes=[Route("/", page)])
