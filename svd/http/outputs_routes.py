"""GET /outputs/ and /outputs/{id}: the kept videos (svd/storage/outputs.py) over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from svd.base.ids import ID
from svd.serving.records import headers_of
from svd.storage.outputs import Outputs

MAX_PAGE = 100


def _page_number(request: Request, name: str, default: int, low: int, high: int | None = None) -> int:
    try:
        value = int(request.query_params.get(name, default))
    except ValueError:
        value = default
    return max(low, value if high is None else min(high, value))


def library_app(outputs: Outputs) -> Starlette:
    async def listing(request: Request) -> Response:
        limit = _page_number(request, "limit", 20, 1, MAX_PAGE)
        offset = _page_number(request, "offset", 0, 0)
        # File reads off the event loop, which must keep answering probes meanwhile.
        records = await run_in_threadpool(outputs.recent, limit + 1, offset)
        more = len(records) > limit
        return JSONResponse(
            {
                "outputs": records[:limit],
                "offset": offset,
                "limit": limit,
                "next_offset": offset + limit if more else None,
            }
        )

    async def one(request: Request) -> Response:
        output_id = request.path_params["output_id"]
        if not ID.fullmatch(output_id):
            return JSONResponse({"error": f"not an output id: ids are 32 hex digits, got {output_id[:80]!r}"}, 400)
        found = await run_in_threadpool(outputs.find, output_id)
        if found is None:
            return JSONResponse({"error": f"no output {output_id}: never made here, or pruned (SVD_OUTPUT_KEEP)"}, 404)
        return serve_output(output_id, *found)

    return Starlette(routes=[Route("/", listing), Route("/{output_id:path}", one)])


def serve_output(output_id: str, video: Path, record: dict[str, Any]) -> FileResponse:
    """A kept video with the headers it was made with."""
    headers = headers_of(output_id, record)
    return FileResponse(
        video,
        media_type=headers.pop("Content-Type"),
        headers=headers,
        filename=video.name,
        content_disposition_type="inline",
    )
