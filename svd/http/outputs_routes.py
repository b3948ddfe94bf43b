"""GET /outputs/ and /outputs/{id}: the kept videos (svd/storage/outputs.py) over HTTP, from the
folder or the bucket they are kept in. A video in a bucket passes through the service, with the
same headers as from a folder (see the README: Kept outputs). A user lists and fetches their own
videos only; another's is answered as one that does not exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from svd.base.ids import ID
from svd.http.answers import unavailable
from svd.http.middleware.auth import caller_of
from svd.serving.records import headers_of
from svd.storage.outputs import Outputs
from svd.storage.storage import Download, StorageUnavailable

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
        caller = caller_of(request.scope)
        try:
            records = await run_in_threadpool(outputs.recent, limit + 1, offset, None if caller.admin else caller.name)
        except StorageUnavailable as down:
            return unavailable(down)
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
        try:
            found = await run_in_threadpool(outputs.find, output_id, caller_of(request.scope))
        except StorageUnavailable as down:
            return unavailable(down)
        if found is None:
            return JSONResponse({"error": f"no output {output_id}: never made here, or pruned (SVD_OUTPUT_KEEP)"}, 404)
        return serve_output(output_id, *found)

    return Starlette(routes=[Route("/", listing), Route("/{output_id:path}", one)])


def serve_output(output_id: str, video: Path | Download, record: dict[str, Any]) -> Response:
    """A kept video with the headers it was made with, from a folder or streamed from a bucket."""
    headers = headers_of(output_id, record)
    media_type = headers.pop("Content-Type")
    if isinstance(video, Path):
        return FileResponse(
            video, media_type=media_type, headers=headers, filename=video.name, content_disposition_type="inline"
        )
    # As FileResponse names a file (ids are ASCII): a saved video gets the same name from either storage.
    headers["Content-Disposition"] = f'inline; filename="{record["file"]}"'
    headers["Content-Length"] = str(video.size)
    return StreamingResponse(_closing(video), media_type=media_type, headers=headers)


def _closing(video: Download) -> Iterator[bytes]:
    """The download's chunks, its connection freed however the response ends."""
    try:
        yield from video.chunks
    finally:
        video.close()
