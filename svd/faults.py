"""Test-only fault injection: make a stage raise CUDA's out-of-memory error on CPU.

Set through SVD_TEST_FAULTS (for example "decode:2,denoise:1": the next two
decode calls and the next denoise fail). Never set in production.
"""

from __future__ import annotations

import threading

import torch

STAGES = ("denoise", "decode")


class Faults:
    """How many more times each stage should fail."""

    def __init__(self, plan: str = ""):
        self._remaining: dict[str, int] = {}
        self._lock = threading.Lock()
        for item in filter(None, (part.strip() for part in plan.split(","))):
            stage, _, count = item.partition(":")
            if stage not in STAGES or not count.isdigit():
                raise ValueError(f"SVD_TEST_FAULTS item {item!r}: use STAGE:COUNT with STAGE one of {', '.join(STAGES)}")
            self._remaining[stage] = int(count)

    def inject(self, stage: str, count: int = 1) -> None:
        with self._lock:
            self._remaining[stage] = self._remaining.get(stage, 0) + count

    def check(self, stage: str) -> None:
        """Raise torch.OutOfMemoryError if a failure of this stage is still planned."""
        with self._lock:
            if self._remaining.get(stage, 0) <= 0:
                return
            self._remaining[stage] -= 1
        raise torch.OutOfMemoryError(f"CUDA out of memory (injected by SVD_TEST_FAULTS at {stage})")
