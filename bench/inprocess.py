"""What the in-process sections share: the tiny model's engine, warm, with the bench's torch threads."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from svd.base.settings import TINY_MODEL_ID, Settings
from svd.serving.engine import Engine


@contextmanager
def tiny_engine(torch_threads: int, prefix: str) -> Iterator[tuple[Engine, Path]]:
    """A ready engine of the tiny model on the CPU (torch_threads 0: torch's default) and a
    temporary folder, both gone afterwards."""
    previous = torch.get_num_threads()
    if torch_threads:
        torch.set_num_threads(torch_threads)
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            engine = Engine(Settings(model_id=TINY_MODEL_ID, device="cpu"))
            assert engine.wait_ready(120), engine.state.message
            yield engine, Path(tmp)
    finally:
        torch.set_num_threads(previous)
