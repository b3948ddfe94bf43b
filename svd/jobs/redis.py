"""The job store every replica shares: Redis, with a stream and a consumer group.

Redis gives the guarantees; each step below is one Lua script, which Redis runs
atomically. A submitted job is a hash (its record and input) and an entry in the
stream `svd:queue`. The first idle worker anywhere reads the oldest entry through
the consumer group `workers`, which delivers each entry once; the entry then stays in
the group's pending list, owned by that worker, until the job ends. The worker's
lease is the entry's idle time in that list: every renewal re-claims the entry for
itself, which resets it. An entry idle for longer than a lease belongs to a worker
that stopped (killed, its machine gone), and the next claim anywhere takes it over
with XAUTOCLAIM, as RQ's and Celery's visibility timeouts do. Idle times are Redis's
clock, so the replicas' clocks never matter; they are kept through a restart of
Redis (append-only file), and a restart gives every lease a full lease to be renewed.

A job's attempt, in its hash, is the one truth about who holds it: a worker acts for
a job only while the hash still names its attempt and the job is in progress.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import wraps
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from svd.base.ids import new_id
from svd.base.progress import Progress
from svd.jobs.events import END, ended_body
from svd.jobs.model import (
    CANCELED,
    FAILED,
    PENDING,
    QUEUED,
    RETENTION_SECONDS,
    Claim,
    Delivery,
    Job,
    JobStatus,
    QueueDepth,
    QueueFull,
    StoreUnavailable,
    UnknownJob,
    Webhook,
    new_delivery_id,
)

logger = logging.getLogger(f"bentoml.{__name__}")

STREAM = "svd:queue"
GROUP = "workers"
WAITING = "svd:waiting"  # job id -> time submitted
RUNNING = "svd:running"  # job id -> time started
LAST_SECONDS = "svd:last-seconds"  # the last completed job's generation time, for Retry-After
JOB = "svd:job:"
DELIVERIES = "svd:deliveries"  # delivery id -> when it is due
DELIVERY = "svd:delivery:"
JOB_FIELDS = ("status", "created", "started", "finished", "attempt", "progress", "error", "error_status")
# Workers that last asked for work or renewed a lease longer ago than a lease count as gone;
# those gone this long with nothing pending are removed from the group.
FORGET_WORKERS_MS = 24 * 3600 * 1000

# Every script first makes sure the group exists: Redis restarted without persistence has none.
ENSURE_GROUP = "redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')\n"

SUBMIT = ENSURE_GROUP + """
-- KEYS: stream, waiting, running, job, last-seconds
-- ARGV: group, per_worker, lease_ms, forget_ms, id, created, image, image_name, controls, progress, webhook, events
local live = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local consumer = {}
  for i = 1, #fields, 2 do consumer[fields[i]] = fields[i + 1] end
  if consumer['idle'] < tonumber(ARGV[3]) then
    live = live + 1
  elseif consumer['pending'] == 0 and consumer['idle'] > tonumber(ARGV[4]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer['name'])
  end
end
local limit = tonumber(ARGV[2]) * math.max(live, 1)
local unfinished = redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
if unfinished >= limit then
  return {unfinished, limit, redis.call('GET', KEYS[5]) or ''}
end
-- The entry is named in the job from the start, so a cancel removes it even before any worker reads it.
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[5])
redis.call('HSET', KEYS[4], 'status', 'pending', 'created', ARGV[6], 'attempt', 0, 'image', ARGV[7],
  'image_name', ARGV[8], 'controls', ARGV[9], 'progress', ARGV[10], 'webhook', ARGV[11], 'webhook_events', ARGV[12],
  'entry', entry)
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
return {}
"""

CLAIM = ENSURE_GROUP + """
-- KEYS: stream, waiting, running
-- ARGV: group, worker, lease_ms, attempts, now, retention, job key prefix, progress
-- Returns {id, failed, attempt, image, image_name, controls}, or {'', failed} when nothing waits;
-- failed lists {id, attempt, worker, started, error} of jobs given up on the way.
local failed = {}
local up_ms = 1000 * tonumber(string.match(redis.call('INFO', 'server'), 'uptime_in_seconds:(%d+)'))
local function done(entry)
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
end
while true do
  -- A job whose worker stopped renewing comes first: it is older than any waiting one. Not in the
  -- first lease after Redis restarts, though: an entry's idle time then counts the time Redis was
  -- down, and the workers holding leases need one lease to renew them.
  local found = {}
  if up_ms >= tonumber(ARGV[3]) then
    found = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', 1)[2]
  end
  if #found == 0 then
    local read = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
    if not read then return {'', failed} end
    found = read[1][2]
  end
  local entry, id = found[1][1], found[1][2][2]
  local job = ARGV[7] .. id
  local status, attempt, worker, started = unpack(redis.call('HMGET', job, 'status', 'attempt', 'worker', 'started'))
  attempt = tonumber(attempt) or 0
  if status == 'in_progress' and attempt >= tonumber(ARGV[4]) then
    local error = 'the worker running this job stopped ' .. attempt .. ' times (killed, out of memory, or its '
      .. 'machine restarted); it is not tried again'
    redis.call('HSET', job, 'status', 'failed', 'finished', ARGV[5], 'error', error, 'error_status', 500)
    redis.call('ZREM', KEYS[3], id)
    redis.call('EXPIRE', job, ARGV[6])
    done(entry)
    table.insert(failed, {id, attempt, worker or '', started or ARGV[5], error})
  elseif status == 'pending' or status == 'in_progress' then
    redis.call('HSET', job, 'status', 'in_progress', 'attempt', attempt + 1, 'worker', ARGV[2],
      'started', ARGV[5], 'entry', entry, 'progress', ARGV[8])
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], ARGV[5], id)
    local image, image_name, controls = unpack(redis.call('HMGET', job, 'image', 'image_name', 'controls'))
    return {id, failed, attempt + 1, image, image_name, controls}
  else
    -- Cancelled while it waited, or its record is gone: nothing to run.
    done(entry)
  end
end
"""

# Only the worker holding the current attempt may act for a job.
HELD = """
local status, attempt, worker, entry, started = unpack(
  redis.call('HMGET', KEYS[2], 'status', 'attempt', 'worker', 'entry', 'started'))
if status ~= 'in_progress' or attempt ~= ARGV[2] then return 0 end
"""

RENEW = ENSURE_GROUP + HELD + """
-- KEYS: stream, job; ARGV: group, attempt[, progress]
-- Claiming its own entry again resets the entry's idle time: the lease starts anew.
redis.call('XCLAIM', KEYS[1], ARGV[1], worker, 0, entry, 'JUSTID')
if ARGV[3] then redis.call('HSET', KEYS[2], 'progress', ARGV[3]) end
return 1
"""

FINISH = ENSURE_GROUP + HELD + """
-- KEYS: stream, job, running, last-seconds
-- ARGV: group, attempt, id, status, now, retention, error, error_status
redis.call('HSET', KEYS[2], 'status', ARGV[4], 'finished', ARGV[5])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[7], 'error_status', ARGV[8]) end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], entry)
redis.call('XDEL', KEYS[1], entry)
redis.call('EXPIRE', KEYS[2], ARGV[6])
if ARGV[4] == 'completed' then redis.call('SET', KEYS[4], tonumber(ARGV[5]) - tonumber(started)) end
return 1
"""

CANCEL = ENSURE_GROUP + """
-- KEYS: stream, job, waiting, running; ARGV: group, id, now, retention
-- Returns -1 for no such job, 0 when it had already finished, 1 when cancelled now.
local status, entry = unpack(redis.call('HMGET', KEYS[2], 'status', 'entry'))
if not status then return -1 end
if status ~= 'pending' and status ~= 'in_progress' then return 0 end
redis.call('HSET', KEYS[2], 'status', 'canceled', 'finished', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
-- Its entry leaves the stream now, waiting or running: the stream's length is the jobs waiting or
-- running, which the worker autoscaler reads (deploy/keda.yaml), and a cancelled job wakes no GPU.
if entry then
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
end
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

KEEP_DELIVERY = """
-- KEYS: job, deliveries; ARGV: delivery id, event, body, now, delivery key prefix, job id
local webhook, events = unpack(redis.call('HMGET', KEYS[1], 'webhook', 'webhook_events'))
if not webhook or webhook == '' then return 0 end
if ARGV[2] ~= 'completed'
  and not string.find(',' .. (events or '') .. ',', ',' .. ARGV[2] .. ',', 1, true) then return 0 end
redis.call('HSET', ARGV[5] .. ARGV[1], 'job_id', ARGV[6], 'url', webhook, 'body', ARGV[3], 'tries', 0)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
return 1
"""

NEXT_DELIVERY = """
-- KEYS: deliveries; ARGV: now, lease, delivery key prefix
-- Held by moving its due time past the try: a worker that dies mid-try leaves it due again.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[1])
local job_id, url, body, tries = unpack(redis.call('HMGET', ARGV[3] .. due[1], 'job_id', 'url', 'body', 'tries'))
return {due[1], job_id, url, body, tries}
"""

T = TypeVar("T")


def _reaching(method: Callable[..., T]) -> Callable[..., T]:
    """Redis unreachable, timing out or still loading its data becomes StoreUnavailable."""

    @wraps(method)
    def call(self: RedisJobs, *args: Any, **kwargs: Any) -> T:
        try:
            return method(self, *args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailable(
                f"the job queue, Redis at {self.where}, is unreachable ({exc}); retry later"
            ) from exc

    return call


class RedisJobs:
    """svd.jobs.store.JobStore on the Redis at `url` (redis://, rediss:// or unix://); `lease` in seconds."""

    def __init__(self, url: str, lease: float = 30, attempts: int = 2):
        self.lease = lease
        self.attempts = attempts
        # Short timeouts and a quick retry: when Redis is down, submit answers 503 at once
        # rather than after redis-py's default backoff of seconds.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2)
        )
        options = self._redis.connection_pool.connection_kwargs
        # Never the password: this goes into errors and logs.
        self.where = options.get("path") or f"{options.get('host')}:{options.get('port')}/{options.get('db', 0)}"
        self._submit, self._claim, self._renew, self._finish, self._cancel, self._keep, self._next = (
            self._redis.register_script(script)
            for script in (SUBMIT, CLAIM, RENEW, FINISH, CANCEL, KEEP_DELIVERY, NEXT_DELIVERY)
        )

    @_reaching
    def submit(
        self, image: bytes, image_name: str, controls: dict[str, Any], per_worker: int, hook: Webhook | None = None
    ) -> Job:
        job = Job(new_id(), PENDING, time.time(), progress=Progress())
        refused = self._submit(
            keys=[STREAM, WAITING, RUNNING, JOB + job.id, LAST_SECONDS],
            args=[
                GROUP,
                per_worker,
                int(self.lease * 1000),
                FORGET_WORKERS_MS,
                job.id,
                repr(job.created),
                image,
                image_name,
                json.dumps(controls),
                QUEUED,
                hook.url if hook else "",
                ",".join(hook.events) if hook else "",
            ],
        )
        if refused:
            unfinished, limit, last = refused
            raise QueueFull(unfinished, limit, float(last) if last else None)
        return job

    @_reaching
    def claim(self, worker: str) -> Claim | None:
        now = time.time()
        job_id, failed, *claimed = self._claim(
            keys=[STREAM, WAITING, RUNNING],
            args=[GROUP, worker, int(self.lease * 1000), self.attempts, repr(now), RETENTION_SECONDS, JOB, QUEUED],
        )
        for given_up, attempt, holder, started, error in failed:
            logger.warning(
                "SVD job %s failed on %s, attempt %d, after %.1f s: %s",
                given_up.decode(), holder.decode(), attempt, now - float(started), error.decode(),
            )
            self.notify(given_up.decode(), END, ended_body(given_up.decode(), FAILED, error.decode(), attempt))
        if not job_id:
            return None
        attempt, image, image_name, controls = claimed
        return Claim(job_id.decode(), attempt, image, image_name.decode(), json.loads(controls))

    @_reaching
    def renew(self, claim: Claim) -> bool:
        return self._renew(keys=[STREAM, JOB + claim.id], args=[GROUP, claim.attempt]) == 1

    @_reaching
    def report(self, claim: Claim, progress: Progress) -> bool:
        return (
            self._renew(keys=[STREAM, JOB + claim.id], args=[GROUP, claim.attempt, json.dumps(asdict(progress))]) == 1
        )

    @_reaching
    def finish(self, claim: Claim, status: str, error: str | None = None, error_status: int | None = None) -> bool:
        return 1 == self._finish(
            keys=[STREAM, JOB + claim.id, RUNNING, LAST_SECONDS],
            args=[
                GROUP,
                claim.attempt,
                claim.id,
                status,
                repr(time.time()),
                RETENTION_SECONDS,
                error or "",
                error_status or 0,
            ],
        )

    @_reaching
    def cancel(self, job_id: str) -> tuple[Job, bool]:
        outcome = self._cancel(
            keys=[STREAM, JOB + job_id, WAITING, RUNNING], args=[GROUP, job_id, repr(time.time()), RETENTION_SECONDS]
        )
        job = self.get(job_id)
        if outcome == -1 or job is None:
            raise UnknownJob(job_id)
        if outcome == 1:
            self.notify(job_id, END, ended_body(job_id, CANCELED, None, job.attempt))
        return job, outcome == 1

    @_reaching
    def get(self, job_id: str) -> Job | None:
        status, created, started, finished, attempt, progress, error, error_status = self._redis.hmget(
            JOB + job_id, JOB_FIELDS
        )
        if status is None:
            return None
        return Job(
            job_id,
            JobStatus(status.decode()),
            float(created),
            started and float(started),
            finished and float(finished),
            int(attempt or 0),
            Progress(**json.loads(progress)) if progress else None,
            error and error.decode(),
            error_status and int(error_status),
        )

    @_reaching
    def input(self, job_id: str) -> tuple[bytes, str, dict[str, Any]] | None:
        image, image_name, controls = self._redis.hmget(JOB + job_id, ("image", "image_name", "controls"))
        return None if image is None else (image, image_name.decode(), json.loads(controls))

    @_reaching
    def depth(self) -> QueueDepth:
        with self._redis.pipeline(transaction=True) as pipe:
            waiting, running, oldest = (
                pipe.zcard(WAITING).zcard(RUNNING).zrange(WAITING, 0, 0, withscores=True).execute()
            )
        return QueueDepth(waiting, running, max(0.0, time.time() - oldest[0][1]) if oldest else 0.0)

    @_reaching
    def notify(self, job_id: str, event: str, body: bytes) -> bool:
        kept = self._keep(
            keys=[JOB + job_id, DELIVERIES], args=[new_delivery_id(), event, body, repr(time.time()), DELIVERY, job_id]
        )
        return kept == 1

    @_reaching
    def next_delivery(self, lease: float) -> Delivery | None:
        due = self._next(keys=[DELIVERIES], args=[repr(time.time()), lease, DELIVERY])
        if not due:
            return None
        delivery_id, job_id, url, body, tries = due
        return Delivery(delivery_id.decode(), job_id.decode(), url.decode(), body, int(tries))

    @_reaching
    def retry_delivery(self, delivery_id: str, tries: int, due: float) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(DELIVERY + delivery_id, "tries", tries).zadd(DELIVERIES, {delivery_id: due}).execute()

    @_reaching
    def delivered(self, delivery_id: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(DELIVERIES, delivery_id).delete(DELIVERY + delivery_id).execute()

    def reachable(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False
