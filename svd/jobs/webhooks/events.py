"""The webhook events a job sends, and the bodies a receiver gets, in Standard Webhooks' envelope.

A job calls back when it starts (`start`) and when it ends. The end event is named
`completed` (`task.completed`) whether the job completed, failed or was cancelled: it is
an event name, not the job status of the same spelling (JobStatus.COMPLETED), and the
body's `status` says how the job ended.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from svd.jobs.model import JobStatus

START = "start"
# The end event, sent whether the job completed, failed or was cancelled.
END = "completed"
EVENTS = (START, END)


def event_body(event: str, job: dict[str, Any]) -> bytes:
    """The JSON a receiver gets, in Standard Webhooks' envelope: type, timestamp and data."""
    envelope = {"type": f"task.{event}", "timestamp": datetime.now(timezone.utc).isoformat(), "data": job}
    return json.dumps(envelope, separators=(",", ":")).encode()


def started_body(job_id: str, attempt: int) -> bytes:
    return event_body(START, {"task_id": job_id, "status": JobStatus.IN_PROGRESS, "attempt": attempt})


def ended_body(job_id: str, status: str, error: str | None, attempt: int, **details: Any) -> bytes:
    """The end event: how the job ended and, for a video, where it is and how it was made."""
    return event_body(END, {"task_id": job_id, "status": status, "error": error, "attempt": attempt, **details})


def wants(events: str | None, event: str) -> bool:
    """Whether a job whose webhook takes `events` (comma-separated) gets `event`: its end always."""
    return event == END or event in (events or "").split(",")
