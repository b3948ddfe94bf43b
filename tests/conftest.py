from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("SVD_MODEL_ID", "tiny")
# The CPU suite runs on the CPU also where CUDA is present; the gpu tier asks for CUDA itself.
os.environ["SVD_DEVICE"] = "cpu"
# The in-process service keeps its videos here, not in the checkout's ./outputs.
os.environ.setdefault("SVD_OUTPUT_DIR", tempfile.mkdtemp(prefix="svd-test-outputs-"))

from harness import Server, build_bento, serve  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: PyTorch here sees none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `bentoml serve` of the tiny model shared by the tests that only send requests."""
    with serve(tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def bento(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Bento `bentoml build` makes of this checkout, offline, once per test session: the product."""
    return build_bento(tmp_path_factory.mktemp("build") / "bentoml", SVD_MODEL_ID="tiny")


@pytest.fixture(scope="session")
def service():
    """The service class instantiated in-process, as `bentoml serve` does."""
    from service import StableDiffusionVideo

    instance = StableDiffusionVideo()
    assert instance.engine.wait_ready(120), instance.engine.state.message
    return instance


@pytest.fixture
def call_service(service, tmp_path: Path):
    """Call /generate in-process inside a request context; returns (video copy, response headers)."""
    from starlette.requests import Request
    from starlette.responses import Response

    from service import StableDiffusionVideo

    def call(**kwargs) -> tuple[Any, dict[str, str]]:
        """The video's path, or the refusal response the service answered instead."""
        context = StableDiffusionVideo.context
        with context.in_request(Request({"type": "http", "headers": []})):
            path = service.generate(context=context, **kwargs)
            if isinstance(path, Response):
                return path, dict(path.headers)
            kept = tmp_path / f"{len(list(tmp_path.iterdir()))}-{path.name}"
            shutil.copy(path, kept)
            return kept, dict(context.response.headers)

    return call
