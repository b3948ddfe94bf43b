"""What a kept video's record says, and the HTTP headers a record answers with: enough to
reproduce a video, or to tell where it came from."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svd.base.settings import Settings
    from svd.core.generate import GenerationResult


def headers_of(output_id: str, record: dict[str, Any]) -> dict[str, str]:
    """What a caller needs to reproduce or report a video, without guessing defaults."""
    return {
        "Content-Type": record["content_type"],
        "X-Seed": str(record["seed"]),
        "X-Settings": json.dumps(record["settings"], separators=(",", ":")),
        # Milliseconds, as the standard wants.
        "Server-Timing": ", ".join(
            f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in record["stage_seconds"].items()
        ),
        "X-Worker": str(record["worker"]),
        "X-Output-Id": output_id,
    }


def record_of(result: GenerationResult, image: Path, settings: Settings) -> dict[str, Any]:
    """What a kept video's sidecar says: enough to reproduce it, or to tell where it came from."""
    digest = hashlib.sha256()
    with image.open("rb") as source:
        for block in iter(lambda: source.read(1 << 20), b""):
            digest.update(block)
    return {
        "content_type": result.content_type,
        "seed": result.params.seed,
        "settings": result.params.__dict__,
        "stage_seconds": {stage: round(seconds, 4) for stage, seconds in result.times.seconds.items()},
        "model": settings.model_id,
        "revision": settings.revision if settings.is_hub_model else None,
        "image_sha256": digest.hexdigest(),
        "worker": settings.worker,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
