"""What a bucket adds to a video's delivery: a default video (25 frames of 1024x576, a pan over the
photo through the service's encoder) kept with its record and served back by GET /outputs/<id>,
through a local folder and through an S3 bucket (moto's S3 server on 127.0.0.1, in this process),
alternating which goes first, median of `runs`. The HTTP stack is the service's own outputs app,
in-process, the same both ways: the difference is the storage's.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from starlette.testclient import TestClient

from bench.encoding import pan_frames, write_ours
from bench.report import Row, Section, median
from harness import s3_server
from svd.base.ids import new_id
from svd.base.retention import Retention
from svd.http.outputs_routes import library_app
from svd.storage.open import storage_at
from svd.storage.outputs import Outputs

RECORD = {"content_type": "video/mp4", "seed": 1, "settings": {}, "stage_seconds": {}, "worker": 1}


def run(photo: Path, runs: int) -> Section:
    with tempfile.TemporaryDirectory(prefix="bench-bucket-") as folder, s3_server() as s3, _environment(s3.env):
        tmp = Path(folder)
        video = tmp / "default.mp4"
        write_ours(pan_frames(photo, 1024, 576, 25), video)
        places = {
            "folder": Outputs(tmp / "outputs", Retention(count=10 * runs)),
            "bucket": Outputs(storage_at(f"{s3.bucket('bench')}/outputs"), Retention(count=10 * runs)),
        }
        kept: dict[str, list[float]] = {name: [] for name in places}
        served: dict[str, list[float]] = {name: [] for name in places}
        for index in range(runs + 1):
            for name in ("folder", "bucket") if index % 2 else ("bucket", "folder"):
                output_id = new_id()
                start = time.perf_counter()
                places[name].save(output_id, video, RECORD)
                middle = time.perf_counter()
                with TestClient(library_app(places[name])) as client:
                    answer = client.get(f"/{output_id}")
                end = time.perf_counter()
                assert answer.status_code == 200 and answer.content == video.read_bytes(), answer.text
                if index:  # the first of each warms up boto3's client and the connection
                    kept[name].append(middle - start)
                    served[name].append(end - middle)
        size = video.stat().st_size
    extra_keep = median(kept["bucket"]) - median(kept["folder"])
    extra_serve = median(served["bucket"]) - median(served["folder"])
    return Section(
        "bucket",
        [
            Row(
                f"keep a default video ({size / 2**10:.0f} KiB) and its record, then prune: folder / bucket, "
                f"median of {runs}",
                f"{median(kept['folder']) * 1000:.1f} / {median(kept['bucket']) * 1000:.1f} ms",
            ),
            Row(
                f"serve it back, GET /outputs/<id>: folder / bucket, median of {runs} (same runs)",
                f"{median(served['folder']) * 1000:.1f} / {median(served['bucket']) * 1000:.1f} ms",
            ),
            Row(
                "what the bucket adds to a default video's delivery (keep + serve)",
                f"{(extra_keep + extra_serve) * 1000:.1f} ms",
            ),
        ],
        {"video_bytes": size, "keep_seconds": kept, "serve_seconds": served},
    )


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """boto3 reads the S3 server's address and credentials from the environment, as the service's does."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
