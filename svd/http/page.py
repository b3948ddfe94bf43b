"""The web page at /ui: static files from svd/static, and the form's fields as /ui/controls.json.

index.html, app.js and style.css call nothing but the service's own API on the same
origin; the page builds its form from controls.json, which is made from CONTROLS,
so its defaults and ranges are the API's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from svd.base.params import CONTROLS

STATIC = Path(__file__).resolve().parent / "static"
# What a browser loads without a way to send the API token; the page's own code, no data.
PUBLIC_FILES = ("app.js", "style.css")

# Only this page's own script and style run; it talks to its own origin and shows blob: media.
HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            "script-src 'self'",
            "style-src 'self'",
            "img-src 'self' blob: data:",
            "media-src 'self' blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class PageFiles(StaticFiles):
    """Starlette's static files, each with the page's security headers."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(HEADERS)
        return response


async def controls(_request: Request) -> JSONResponse:
    return JSONResponse([control.as_json() for control in CONTROLS], headers=HEADERS)


ui_app = Starlette(
    routes=[Route("/controls.json", controls), Mount("/", PageFiles(directory=STATIC, html=True))]
)
