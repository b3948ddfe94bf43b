"""Opens the job store the settings name; the one module that knows both stores."""

from __future__ import annotations

from pathlib import Path

from svd.base.settings import Settings
from svd.jobs.store import JobStore


def open_store(settings: Settings) -> JobStore:
    """The job store the settings name: Redis at SVD_QUEUE_URL, else the SQLite file SVD_JOBS_DB."""
    # Each store imported when named: the redis package only where SVD_QUEUE_URL is set.
    if settings.queue_url:
        from svd.jobs.redis import RedisJobs

        return RedisJobs(settings.queue_url, settings.job_lease, settings.job_attempts, settings.input_keep)
    from svd.jobs.sqlite import SQLiteJobs

    return SQLiteJobs(
        Path(settings.jobs_db), settings.job_lease, settings.job_attempts, settings.workers, settings.input_keep
    )
