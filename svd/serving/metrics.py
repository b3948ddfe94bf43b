"""The service's Prometheus metrics, served at /metrics beside BentoML's own.

Created through bentoml.metrics so they join BentoML's multiprocess registry.
"""

from __future__ import annotations

import bentoml

GENERATIONS = bentoml.metrics.Counter(
    name="svd_generations",
    documentation="Generations by outcome: ok, bad_input, busy, not_ready, out_of_memory, too_big_for_gpu, "
    "device_failure, timeout, canceled, error.",
    labelnames=["outcome"],
)
GENERATION_SECONDS = bentoml.metrics.Histogram(
    name="svd_generation_seconds",
    documentation="Seconds from admission to a finished video, for successful generations.",
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)
STAGE_SECONDS = bentoml.metrics.Histogram(
    name="svd_stage_seconds",
    documentation="Seconds per stage: prepare, encode, denoise, decode, video.",
    labelnames=["stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 20, 60, 120, 300),
)
FRAMES = bentoml.metrics.Counter(name="svd_frames_generated", documentation="Video frames generated.")
OOM_RETRIES = bentoml.metrics.Counter(
    name="svd_oom_retries", documentation="VAE decodes retried with a smaller chunk after running out of GPU memory."
)
REFUSED = bentoml.metrics.Counter(
    name="svd_requests_refused",
    documentation="Requests refused before generating, by reason: busy, not_ready, too_large, unauthorized, "
    "url_not_file, unknown_field.",
    labelnames=["reason"],
)
IN_FLIGHT = bentoml.metrics.Gauge(
    name="svd_in_flight",
    documentation="Generations admitted and not finished: running, waiting for the GPU, or preparing.",
    multiprocess_mode="livesum",
)
# The job queue, read from the store at each scrape by whichever worker answers it: the same
# for every worker and, with SVD_QUEUE_URL, for every replica.
JOBS_WAITING = bentoml.metrics.Gauge(
    name="svd_jobs_waiting",
    documentation="Jobs submitted and waiting for a GPU: what the autoscaler scales on.",
    multiprocess_mode="mostrecent",
)
JOBS_RUNNING = bentoml.metrics.Gauge(
    name="svd_jobs_running",
    documentation="Jobs running on a GPU, or whose worker stopped and which wait to be taken again.",
    multiprocess_mode="mostrecent",
)
OLDEST_WAITING_SECONDS = bentoml.metrics.Gauge(
    name="svd_jobs_oldest_waiting_seconds",
    documentation="Seconds the oldest waiting job has waited; 0 when none waits.",
    multiprocess_mode="mostrecent",
)
EVENT_STREAMS = bentoml.metrics.Gauge(
    name="svd_event_streams",
    documentation="Clients following a job's events (ROUTE/events) now.",
    multiprocess_mode="livesum",
)
# Per user (svd/base/users.py's label_of): the users the configuration names, `admin`, `anonymous`
# on an open service and `other` for a user since removed, so the labels stay few.
USER_JOBS_WAITING = bentoml.metrics.Gauge(
    name="svd_user_jobs_waiting",
    documentation="Each user's jobs waiting for a GPU.",
    labelnames=["user"],
    multiprocess_mode="mostrecent",
)
USER_JOBS_RUNNING = bentoml.metrics.Gauge(
    name="svd_user_jobs_running",
    documentation="Each user's jobs running on a GPU.",
    labelnames=["user"],
    multiprocess_mode="mostrecent",
)
GPU_SECONDS = bentoml.metrics.Counter(
    name="svd_user_gpu_seconds",
    documentation="Seconds each user's jobs ran on this service's GPU workers, whatever their end.",
    labelnames=["user"],
)
