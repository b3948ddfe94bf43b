"""How much the output folder keeps (SVD_OUTPUT_KEEP): a count of videos, or a size on disk."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Retention:
    """How much the folder keeps: the newest `count` videos, or the newest that fit in `bytes`."""

    count: int | None = None
    bytes: int | None = None


def parse_retention(text: str) -> Retention:
    """`500` keeps 500 videos; `10GB` (KB, MB, GB, TB) keeps the newest that fit in 10 GB."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMGT]B)?\s*", text, re.IGNORECASE)
    if not match or int(match.group(1)) == 0:
        raise ValueError(f"{text!r} is neither a count (500) nor a size (10GB)")
    number, unit = int(match.group(1)), (match.group(2) or "").upper()
    if not unit:
        return Retention(count=number)
    return Retention(bytes=number * 1000 ** ("KMGT".index(unit[0]) + 1))
