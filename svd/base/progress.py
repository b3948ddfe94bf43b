"""Where a generation is, as the generation core reports it and /progress shows it.

Kept apart from svd/core/generate.py so that the job store and the HTTP routes can use it
without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Progress:
    """Where a generation is: its stage, the step within it, and the segment."""

    stage: str = "queued"
    step: int = 0
    steps: int = 0
    segment: int = 1
    segments: int = 1


ProgressCallback = Callable[[Progress], None]
