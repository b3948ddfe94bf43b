"""Serving overhead: the same small request over HTTP and as an in-process pipeline call.

In-process does what the service does for a request (prepare the image, generate,
encode) on a model of its own; the difference is HTTP, BentoML and the client.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import bentoml
import torch

from bench.report import Row, Section, median
from bench.server import REQUEST_TIMEOUT
from harness import PHOTO, Server
from svd.base.params import GenerationParams
from svd.base.settings import TINY_MODEL_ID, Settings
from svd.core.generate import generate
from svd.core.loading import load_pipeline
from svd.media.images import prepare_image

MAX_RATIO = 1.05


def run(server: Server, request: dict[str, int], runs: int, torch_threads: int) -> Section:
    """`torch_threads` as the server was started with (0: torch's default), so both sides compute alike."""
    previous = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        return _compare(server, request, runs)
    finally:
        torch.set_num_threads(previous)


def _compare(server: Server, request: dict[str, int], runs: int) -> Section:
    settings = Settings(model_id=TINY_MODEL_ID)
    model = load_pipeline(settings)
    params = GenerationParams(**request).resolve(model.max_frames)  # type: ignore[arg-type]

    def in_process() -> float:
        with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
            start = time.perf_counter()
            image = prepare_image(PHOTO, params.width, params.height, params.sizing, settings.max_pixels)
            generate(model, image, params, Path(tmp))
            return time.perf_counter() - start

    with bentoml.SyncHTTPClient(server.url, timeout=REQUEST_TIMEOUT) as client:

        def over_http() -> float:
            start = time.perf_counter()
            client.generate(image=PHOTO, **request)
            return time.perf_counter() - start

        ways = {"in_process": in_process, "http": over_http}
        # One unmeasured call each: the first pays for lazy initialisation and the connection.
        for way in ways.values():
            way()
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for run_index in range(runs):
            # Alternate the order so a slow patch on this shared machine hits both ways alike.
            for name in list(ways) if run_index % 2 == 0 else reversed(list(ways)):
                seconds[name].append(ways[name]())

    local, remote = median(seconds["in_process"]), median(seconds["http"])
    ratio = remote / local
    return Section(
        "serving",
        rows=[
            Row(f"in-process pipeline call (median of {runs})", f"{local:.2f} s"),
            Row(f"HTTP, bentoml.SyncHTTPClient (median of {runs})", f"{remote:.2f} s"),
            Row("HTTP / in-process", f"{ratio:.3f}", f"≤ {MAX_RATIO}", ratio <= MAX_RATIO),
        ],
        data={
            "request": request,
            "seconds": {name: [round(value, 3) for value in values] for name, values in seconds.items()},
            "ratio": round(ratio, 4),
        },
    )
