"""The job store every replica shares: Redis, with a stream and a consumer group.

Redis gives the guarantees; each step below is one Lua script, which Redis runs
atomically. A submitted job is a hash (its record, input and owner) and an entry in the
stream `svd:queue`. The first idle worker anywhere takes the job the fair-turn rule picks
(svd/jobs/fair.py) by claiming its entry for itself in the consumer group `workers` (XCLAIM
FORCE), which hands each entry to one consumer; the entry then stays in the group's pending
list, owned by that worker, until the job ends. The worker's
lease is the entry's idle time in that list: every renewal re-claims the entry for
itself, which resets it. An entry idle for longer than a lease belongs to a worker
that stopped (killed, its machine gone), and the next claim anywhere takes it over
with XAUTOCLAIM, as RQ's and Celery's visibility timeouts do. Idle times are Redis's
clock, so the replicas' clocks never matter; they are kept through a restart of
Redis (append-only file), and a restart, or a replica promoted in its place, gives every
lease a full lease to be renewed.

A job's attempt, in its hash, is the one truth about who holds it: a worker acts for
a job only while the hash still names its attempt and the job is in progress.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime, timezone
from functools import wraps
from typing import Any, TypeVar

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from svd.base.ids import new_id
from svd.base.progress import Progress
from svd.jobs.eta import NEW_RUN_WEIGHT, runs_of, speeds_of
from svd.jobs.fair import HALF_LIFE_SECONDS, turn_order
from svd.jobs.model import (
    IDEMPOTENCY_SECONDS,
    IN_PROGRESS,
    INPUT_KEEP_BYTES,
    PENDING,
    QUEUED,
    RETENTION_SECONDS,
    Claim,
    Delivery,
    Idempotency,
    Job,
    JobStatus,
    KeyReused,
    QueueDepth,
    QueueFull,
    Speeds,
    StoreUnavailable,
    Unfinished,
    UnknownJob,
    UserQueueFull,
    Webhook,
    image_hash,
    new_delivery_id,
)

logger = logging.getLogger(f"bentoml.{__name__}")

STREAM = "svd:queue"
GROUP = "workers"
WAITING = "svd:waiting"  # job id -> time submitted
RUNNING = "svd:running"  # job id -> time started
LAST_SECONDS = "svd:last-seconds"  # the last completed job's generation time, for Retry-After
JOB = "svd:job:"
IMAGES = "svd:images"  # image hash -> when a job last used it
IMAGE = "svd:image:"  # + hash: the image's bytes
IMAGE_BYTES = "svd:image-bytes"  # the bytes of the images kept
SERVING_RUN_ID = "svd:serving-run-id"  # the run id of the Redis process that serves the queue
SERVING_SINCE = "svd:serving-since"  # since when it does, in its clock's milliseconds
EVENTS = ":events"  # after a job's key: the stream of its changes
IDEMPOTENCY = "svd:idempotency:"  # + the scoped Idempotency-Key: its request and job
SPEEDS = "svd:speeds"  # key -> learned seconds (svd/jobs/eta.py's runs_of)
USAGE = "svd:usage"  # owner -> GPU seconds, as they counted when last recorded (svd/jobs/fair.py)
USAGE_AT = "svd:usage-at"  # owner -> when they were recorded
DELIVERIES = "svd:deliveries"  # delivery id -> when it is due
DELIVERY = "svd:delivery:"
JOB_FIELDS = ("status", "created", "started", "finished", "attempt", "progress", "error", "error_status", "owner")
# Workers gone this long with nothing pending are removed from the group (LIVE_WORKERS).
FORGET_WORKERS_MS = 24 * 3600 * 1000

# Every script first makes sure the group exists: Redis restarted without persistence has none.
# It also defines log(), which records a job's change in the stream of its events, and
# forget(), which lets a finished job's record and events expire together.
ENSURE_GROUP = """redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
local function log(job)
  local names = {'status', 'created', 'started', 'finished', 'attempt', 'progress', 'error', 'error_status'}
  local values = redis.call('HMGET', job, unpack(names))
  local fields = {}
  for i, name in ipairs(names) do
    if values[i] then
      table.insert(fields, name)
      table.insert(fields, values[i])
    end
  end
  redis.call('XADD', job .. ':events', 'MAXLEN', '~', 10000, '*', unpack(fields))
end
local function forget(job, seconds)
  redis.call('EXPIRE', job, seconds)
  redis.call('EXPIRE', job .. ':events', seconds)
end
"""

# Each owner's recent GPU time (svd/jobs/fair.py): charge() counts a job that stops running to its
# owner; used() is every owner's, with what their running jobs have run so far.
USAGE_LUA = """
local function decayed(seconds, at, now, half_life)
  return tonumber(seconds) * 0.5 ^ (math.max(0, now - tonumber(at or now)) / half_life)
end
local function charge(usage, usage_at, owner, seconds, now, half_life)
  local old, at = redis.call('HGET', usage, owner), redis.call('HGET', usage_at, owner)
  local kept = old and decayed(old, at, now, half_life) or 0
  redis.call('HSET', usage, owner, string.format('%.17g', kept + math.max(0, seconds)))
  redis.call('HSET', usage_at, owner, string.format('%.17g', now))
end
local function used(usage, usage_at, running, prefix, now, half_life)
  local seconds = {}
  local kept = redis.call('HGETALL', usage)
  for i = 1, #kept, 2 do
    seconds[kept[i]] = decayed(kept[i + 1], redis.call('HGET', usage_at, kept[i]), now, half_life)
  end
  local started = redis.call('ZRANGE', running, 0, -1, 'WITHSCORES')
  for i = 1, #started, 2 do
    local owner = redis.call('HGET', prefix .. started[i], 'owner') or ''
    seconds[owner] = (seconds[owner] or 0) + math.max(0, now - tonumber(started[i + 1]))
  end
  return seconds
end
"""

# Keeps a delivery of `body` to the job's webhook when it wants `event` (its end, always). Every
# script that ends a job calls it, so a job's end event is kept in the step that ends it.
KEEP = """
local function keep(job, job_id, event, body, delivery_id, now, deliveries, prefix)
  local webhook, events = unpack(redis.call('HMGET', job, 'webhook', 'webhook_events'))
  if not webhook or webhook == '' then return 0 end
  if event ~= 'completed'
    and not string.find(',' .. (events or '') .. ',', ',' .. event .. ',', 1, true) then return 0 end
  redis.call('HSET', prefix .. delivery_id, 'job_id', job_id, 'url', webhook, 'body', body, 'tries', 0)
  redis.call('ZADD', deliveries, now, delivery_id)
  return 1
end
-- The events the scripts write themselves, as svd/jobs/webhooks/events.py's started_body and ended_body do.
local function event(type, data, timestamp)
  return cjson.encode({type = type, timestamp = timestamp, data = data})
end
local function ended(job_id, status, error, attempt, timestamp)
  return event('task.completed', {task_id = job_id, status = status, error = error or cjson.null,
    attempt = tonumber(attempt)}, timestamp)
end
"""

# The workers taking jobs: the group's consumers that asked for work or renewed a lease within a
# lease (lease_ms); those gone forget_ms with nothing pending are removed from the group.
LIVE_WORKERS = """
local function live_workers(stream, group, lease_ms, forget_ms)
  local live = 0
  for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', stream, group)) do
    local consumer = {}
    for i = 1, #fields, 2 do consumer[fields[i]] = fields[i + 1] end
    if consumer['idle'] < tonumber(lease_ms) then
      live = live + 1
    elseif consumer['pending'] == 0 and consumer['idle'] > tonumber(forget_ms) then
      redis.call('XGROUP', 'DELCONSUMER', stream, group, consumer['name'])
    end
  end
  return live
end
"""

WORKERS = ENSURE_GROUP + LIVE_WORKERS + """
-- KEYS: stream; ARGV: group, lease_ms, forget_ms
return live_workers(KEYS[1], ARGV[1], ARGV[2], ARGV[3])
"""

SUBMIT = ENSURE_GROUP + LIVE_WORKERS + """
-- KEYS: stream, waiting, running, job, last-seconds, images, image bytes, idempotency key
-- ARGV: group, per_worker, lease_ms, forget_ms, id, created, image, image_name, controls, progress, webhook, events,
--       image hash, image key prefix, input_keep, retention, job key prefix, request ('' without a key), key seconds,
--       owner, per_user (0: no bound)
-- Returns {} when queued, {unfinished, limit, last seconds} when full, {owned, per_user, last seconds, 'user'} when
-- the owner's share is, {0, id} for the key's job, {-1, id} when the key was used with another request.
if ARGV[18] ~= '' then
  local request, first = unpack(redis.call('HMGET', KEYS[8], 'request', 'job'))
  if request and request ~= ARGV[18] then return {-1, first} end
  if request and redis.call('EXISTS', ARGV[17] .. first) == 1 then return {0, first} end
end
local live = live_workers(KEYS[1], ARGV[1], ARGV[3], ARGV[4])
local limit = tonumber(ARGV[2]) * math.max(live, 1)
local unfinished = redis.call('ZCARD', KEYS[2]) + redis.call('ZCARD', KEYS[3])
if unfinished >= limit then
  return {unfinished, limit, redis.call('GET', KEYS[5]) or ''}
end
if tonumber(ARGV[21]) > 0 then
  local owned = 0
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      if (redis.call('HGET', ARGV[17] .. id, 'owner') or '') == ARGV[20] then owned = owned + 1 end
    end
  end
  if owned >= tonumber(ARGV[21]) then return {owned, tonumber(ARGV[21]), redis.call('GET', KEYS[5]) or '', 'user'} end
end
-- The image kept once by its hash, however many jobs (retries) use it.
if redis.call('EXISTS', ARGV[14] .. ARGV[13]) == 0 then
  redis.call('SET', ARGV[14] .. ARGV[13], ARGV[7])
  redis.call('INCRBY', KEYS[7], #ARGV[7])
end
redis.call('ZADD', KEYS[6], ARGV[6], ARGV[13])
-- The entry is named in the job from the start, so a cancel removes it even before any worker reads it.
local entry = redis.call('XADD', KEYS[1], '*', 'id', ARGV[5])
redis.call('HSET', KEYS[4], 'status', 'pending', 'created', ARGV[6], 'attempt', 0, 'image_hash', ARGV[13],
  'image_name', ARGV[8], 'controls', ARGV[9], 'progress', ARGV[10], 'webhook', ARGV[11], 'webhook_events', ARGV[12],
  'entry', entry, 'owner', ARGV[20])
redis.call('ZADD', KEYS[2], ARGV[6], ARGV[5])
log(KEYS[4])
if ARGV[18] ~= '' then
  redis.call('HSET', KEYS[8], 'request', ARGV[18], 'job', ARGV[5])
  redis.call('EXPIRE', KEYS[8], ARGV[19])
end
-- Images beyond input_keep, or last submitted longer ago than a finished job's record lives,
-- go, least recently submitted first; never one an unfinished job needs.
local kept, stale = tonumber(redis.call('GET', KEYS[7]) or 0), tonumber(ARGV[6]) - tonumber(ARGV[16])
local oldest = redis.call('ZRANGE', KEYS[6], 0, 0, 'WITHSCORES')
if kept > tonumber(ARGV[15]) or tonumber(oldest[2]) < stale then
  local needed = {}
  for _, key in ipairs({KEYS[2], KEYS[3]}) do
    for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      needed[redis.call('HGET', ARGV[17] .. id, 'image_hash') or ''] = true
    end
  end
  local images = redis.call('ZRANGE', KEYS[6], 0, -1, 'WITHSCORES')
  for i = 1, #images, 2 do
    if kept <= tonumber(ARGV[15]) and tonumber(images[i + 1]) >= stale then break end
    if not needed[images[i]] then
      kept = kept - redis.call('STRLEN', ARGV[14] .. images[i])
      redis.call('DEL', ARGV[14] .. images[i])
      redis.call('ZREM', KEYS[6], images[i])
    end
  end
  redis.call('SET', KEYS[7], kept)
end
return {}
"""

CLAIM = ENSURE_GROUP + KEEP + USAGE_LUA + """
-- KEYS: stream, waiting, running, deliveries, serving run id, serving since, usage, usage at
-- ARGV: group, worker, lease_ms, attempts, now, retention, job key prefix, progress,
--       delivery id, delivery key prefix, timestamp, image key prefix, half-life
-- Returns {id, failed, attempt, image, image_name, controls, owner}, or {'', failed} when nothing waits;
-- failed lists {id, attempt, worker, started, error} of jobs given up on the way.
local failed = {}
-- How long this Redis process has served the queue: since the first claim that found another
-- run id in the data, which a restart and a replica promoted in its place both change (a
-- promoted replica's uptime does not).
local run_id = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)')
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
if redis.call('GET', KEYS[5]) ~= run_id then
  redis.call('SET', KEYS[5], run_id)
  redis.call('SET', KEYS[6], now_ms)
end
local up_ms = now_ms - tonumber(redis.call('GET', KEYS[6]))
local function done(entry)
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
end
-- The oldest waiting job of the owner with the least GPU time (svd/jobs/fair.py), and its stream
-- entry, now this worker's: XCLAIM FORCE takes an entry no worker has read yet.
local function fair_turn()
  local seconds = used(KEYS[7], KEYS[8], KEYS[3], ARGV[7], tonumber(ARGV[5]), tonumber(ARGV[13]))
  local best, least
  for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    local owner = redis.call('HGET', ARGV[7] .. id, 'owner') or ''
    if not best or (seconds[owner] or 0) < least then best, least = id, seconds[owner] or 0 end
  end
  if not best then return nil end
  local entry = redis.call('HGET', ARGV[7] .. best, 'entry')
  if not entry or #redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'FORCE', 'JUSTID') == 0 then
    -- Its entry is gone from the stream (its record expired, or Redis lost the stream): a new one.
    entry = redis.call('XADD', KEYS[1], '*', 'id', best)
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, entry, 'FORCE', 'JUSTID')
  end
  return {{entry, {'id', best}}}
end
while true do
  -- A job whose worker stopped renewing comes first: it is older than any waiting one. Not in the
  -- first lease after Redis restarts, though: an entry's idle time then counts the time Redis was
  -- down, and the workers holding leases need one lease to renew them.
  -- XAUTOCLAIM looks at ten entries per one it may claim: its cursor is walked through the whole
  -- pending list, so that a lapsed lease behind ten live ones is found.
  local found, cursor = {}, '0-0'
  if up_ms >= tonumber(ARGV[3]) then
    repeat
      local scanned = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], cursor, 'COUNT', 1)
      cursor, found = scanned[1], scanned[2]
    until #found > 0 or cursor == '0-0'
  end
  if #found == 0 then
    found = fair_turn()
    if not found then
      -- Asking for work makes the worker one taking jobs (LIVE_WORKERS): a read of its own pending
      -- entries creates its consumer and resets its idle time, on every Redis 7.
      redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', KEYS[1], '0')
      return {'', failed}
    end
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
    redis.call('ZREM', KEYS[2], id)
    log(job)
    forget(job, ARGV[6])
    done(entry)
    table.insert(failed, {id, attempt, worker or '', started or ARGV[5], error})
    keep(job, id, 'completed', ended(id, 'failed', error, attempt, ARGV[11]), ARGV[9] .. '-' .. #failed, ARGV[5],
      KEYS[4], ARGV[10])
  elseif status == 'pending' or status == 'in_progress' then
    redis.call('HSET', job, 'status', 'in_progress', 'attempt', attempt + 1, 'worker', ARGV[2],
      'started', ARGV[5], 'entry', entry, 'progress', ARGV[8])
    redis.call('ZREM', KEYS[2], id)
    redis.call('ZADD', KEYS[3], ARGV[5], id)
    log(job)
    keep(job, id, 'start', event('task.start', {task_id = id, status = 'in_progress', attempt = attempt + 1}, ARGV[11]),
      ARGV[9], ARGV[5], KEYS[4], ARGV[10])
    local image, digest, image_name, controls, owner = unpack(
      redis.call('HMGET', job, 'image', 'image_hash', 'image_name', 'controls', 'owner'))
    if digest then image = redis.call('GET', ARGV[12] .. digest) end
    return {id, failed, attempt + 1, image, image_name, controls, owner or ''}
  else
    -- Cancelled while it waited, or its record is gone: nothing to run.
    redis.call('ZREM', KEYS[2], id)
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
if ARGV[3] then
  redis.call('HSET', KEYS[2], 'progress', ARGV[3])
  log(KEYS[2])
end
return 1
"""

FINISH = ENSURE_GROUP + KEEP + USAGE_LUA + HELD + """
-- KEYS: stream, job, running, last-seconds, deliveries, usage, usage at
-- ARGV: group, attempt, id, status, now, retention, error, error_status, end event, delivery id, delivery prefix,
--       half-life
charge(KEYS[6], KEYS[7], redis.call('HGET', KEYS[2], 'owner') or '', tonumber(ARGV[5]) - tonumber(started),
  tonumber(ARGV[5]), tonumber(ARGV[12]))
redis.call('HSET', KEYS[2], 'status', ARGV[4], 'finished', ARGV[5])
if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], 'error', ARGV[7], 'error_status', ARGV[8]) end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], entry)
redis.call('XDEL', KEYS[1], entry)
log(KEYS[2])
forget(KEYS[2], ARGV[6])
if ARGV[4] == 'completed' then redis.call('SET', KEYS[4], tonumber(ARGV[5]) - tonumber(started)) end
if ARGV[9] ~= '' then keep(KEYS[2], ARGV[3], 'completed', ARGV[9], ARGV[10], ARGV[5], KEYS[5], ARGV[11]) end
return 1
"""

CANCEL = ENSURE_GROUP + KEEP + USAGE_LUA + """
-- KEYS: stream, job, waiting, running, deliveries, usage, usage at
-- ARGV: group, id, now, retention, delivery id, delivery key prefix, timestamp, half-life
-- Returns -1 for no such job, 0 when it had already finished, 1 when cancelled now.
local status, entry, attempt, owner, started = unpack(
  redis.call('HMGET', KEYS[2], 'status', 'entry', 'attempt', 'owner', 'started'))
if not status then return -1 end
if status ~= 'pending' and status ~= 'in_progress' then return 0 end
if status == 'in_progress' then
  charge(KEYS[6], KEYS[7], owner or '', tonumber(ARGV[3]) - tonumber(started), tonumber(ARGV[3]), tonumber(ARGV[8]))
end
redis.call('HSET', KEYS[2], 'status', 'canceled', 'finished', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[2])
-- Its entry leaves the stream now, waiting or running: the stream's length is the jobs waiting or
-- running, which the worker autoscaler reads (deploy/keda.yaml), and a cancelled job wakes no GPU.
if entry then
  redis.call('XACK', KEYS[1], ARGV[1], entry)
  redis.call('XDEL', KEYS[1], entry)
end
log(KEYS[2])
forget(KEYS[2], ARGV[4])
keep(KEYS[2], ARGV[2], 'completed', ended(ARGV[2], 'canceled', nil, attempt or 0, ARGV[7]), ARGV[5], ARGV[3], KEYS[5],
  ARGV[6])
return 1
"""

KEEP_DELIVERY = KEEP + """
-- KEYS: job, deliveries; ARGV: delivery id, event, body, now, delivery key prefix, job id
return keep(KEYS[1], ARGV[6], ARGV[2], ARGV[3], ARGV[1], ARGV[4], KEYS[2], ARGV[5])
"""

NEXT_DELIVERY = """
-- KEYS: deliveries; ARGV: now, lease, delivery key prefix
-- Held by moving its due time past the try: a worker that dies mid-try leaves it due again.
while true do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
  if #due == 0 then return false end
  local job_id, url, body, tries = unpack(redis.call('HMGET', ARGV[3] .. due[1], 'job_id', 'url', 'body', 'tries'))
  if job_id then
    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[2]), due[1])
    return {due[1], job_id, url, body, tries}
  end
  -- A delivery's record gone (written by a release before this one): nothing to send.
  redis.call('ZREM', KEYS[1], due[1])
end
"""

RETRY_DELIVERY = """
-- KEYS: deliveries, delivery; ARGV: delivery id, tries, due
-- Only a delivery still kept: another sender's try may have delivered it meanwhile.
if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'tries', ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""

LEARN = """
-- KEYS: speeds; ARGV: weight of the new run (svd/jobs/eta.py's learned), then each key and the run's seconds for it
for i = 2, #ARGV, 2 do
  local old, new = redis.call('HGET', KEYS[1], ARGV[i]), tonumber(ARGV[i + 1])
  if old then new = tonumber(old) + tonumber(ARGV[1]) * (new - tonumber(old)) end
  redis.call('HSET', KEYS[1], ARGV[i], string.format('%.17g', new))
end
"""
# A stream entry's id, as a client may send it back in Last-Event-ID.
ENTRY_ID = re.compile(r"\d{1,20}-\d{1,20}")

T = TypeVar("T")


def _timestamp(now: float) -> str:
    """The envelope's timestamp, as svd/jobs/webhooks/events.py writes it."""
    return datetime.fromtimestamp(now, timezone.utc).isoformat()


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

    def __init__(self, url: str, lease: float = 30, attempts: int = 2, input_keep: int = INPUT_KEEP_BYTES):
        self.lease = lease
        self.input_keep = input_keep
        self.attempts = attempts
        # Short timeouts and a quick retry: when Redis is down, submit answers 503 at once
        # rather than after redis-py's default backoff of seconds.
        self._redis = redis.Redis.from_url(
            url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), 2)
        )
        options = self._redis.connection_pool.connection_kwargs
        # Never the password: this goes into errors and logs.
        self.where = options.get("path") or f"{options.get('host')}:{options.get('port')}/{options.get('db', 0)}"
        (
            self._submit,
            self._claim,
            self._renew,
            self._finish,
            self._cancel,
            self._keep,
            self._next,
            self._retry,
            self._learn,
            self._workers,
        ) = (
            self._redis.register_script(script)
            for script in (
                SUBMIT, CLAIM, RENEW, FINISH, CANCEL, KEEP_DELIVERY, NEXT_DELIVERY, RETRY_DELIVERY, LEARN, WORKERS
            )
        )

    @_reaching
    def submit(
        self, image: bytes, image_name: str, controls: dict[str, Any], per_worker: int, hook: Webhook | None = None,
        idempotency: Idempotency | None = None, owner: str = "", per_user: int = 0,
    ) -> Job:
        job = Job(new_id(), PENDING, time.time(), progress=Progress(), owner=owner)
        key = IDEMPOTENCY + (idempotency.key if idempotency else "")
        refused = self._submit(
            keys=[STREAM, WAITING, RUNNING, JOB + job.id, LAST_SECONDS, IMAGES, IMAGE_BYTES, key],
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
                image_hash(image),
                IMAGE,
                self.input_keep,
                RETENTION_SECONDS,
                JOB,
                idempotency.request if idempotency else "",
                IDEMPOTENCY_SECONDS,
                owner,
                per_user,
            ],
        )
        if len(refused) == 2:
            outcome, first = refused
            if outcome == -1:
                raise KeyReused(first.decode())
            return self.get(first.decode()) or job
        if len(refused) == 4:
            owned, limit, last, _ = refused
            raise UserQueueFull(owned, limit, float(last) if last else None)
        if refused:
            unfinished, limit, last = refused
            raise QueueFull(unfinished, limit, float(last) if last else None)
        return job

    @_reaching
    def claim(self, worker: str) -> Claim | None:
        now = time.time()
        job_id, failed, *claimed = self._claim(
            keys=[STREAM, WAITING, RUNNING, DELIVERIES, SERVING_RUN_ID, SERVING_SINCE, USAGE, USAGE_AT],
            args=[
                GROUP, worker, int(self.lease * 1000), self.attempts, repr(now), RETENTION_SECONDS, JOB, QUEUED,
                new_delivery_id(), DELIVERY, _timestamp(now), IMAGE, HALF_LIFE_SECONDS,
            ],
        )
        for given_up, attempt, holder, started, error in failed:
            logger.warning(
                "SVD job %s failed on %s, attempt %d, after %.1f s: %s",
                given_up.decode(), holder.decode(), attempt, now - float(started), error.decode(),
            )
        if not job_id:
            return None
        attempt, image, image_name, controls, owner = claimed
        return Claim(job_id.decode(), attempt, image, image_name.decode(), json.loads(controls), owner.decode())

    @_reaching
    def renew(self, claim: Claim) -> bool:
        return self._renew(keys=[STREAM, JOB + claim.id], args=[GROUP, claim.attempt]) == 1

    @_reaching
    def report(self, claim: Claim, progress: Progress) -> bool:
        return (
            self._renew(keys=[STREAM, JOB + claim.id], args=[GROUP, claim.attempt, json.dumps(asdict(progress))]) == 1
        )

    @_reaching
    def finish(
        self,
        claim: Claim,
        status: str,
        error: str | None = None,
        error_status: int | None = None,
        ended: bytes | None = None,
    ) -> bool:
        return 1 == self._finish(
            keys=[STREAM, JOB + claim.id, RUNNING, LAST_SECONDS, DELIVERIES, USAGE, USAGE_AT],
            args=[
                GROUP,
                claim.attempt,
                claim.id,
                status,
                repr(time.time()),
                RETENTION_SECONDS,
                error or "",
                error_status or 0,
                ended or b"",
                new_delivery_id(),
                DELIVERY,
                HALF_LIFE_SECONDS,
            ],
        )

    @_reaching
    def cancel(self, job_id: str) -> tuple[Job, bool]:
        now = time.time()
        outcome = self._cancel(
            keys=[STREAM, JOB + job_id, WAITING, RUNNING, DELIVERIES, USAGE, USAGE_AT],
            args=[
                GROUP, job_id, repr(now), RETENTION_SECONDS, new_delivery_id(), DELIVERY, _timestamp(now),
                HALF_LIFE_SECONDS,
            ],
        )
        job = self.get(job_id)
        if outcome == -1 or job is None:
            raise UnknownJob(job_id)
        return job, outcome == 1

    @_reaching
    def get(self, job_id: str) -> Job | None:
        return _job(job_id, self._redis.hmget(JOB + job_id, JOB_FIELDS))

    @_reaching
    def events(self, job_id: str, after: str | None = None) -> list[tuple[str, Job]]:
        start = f"({after}" if after and ENTRY_ID.fullmatch(after) else "-"
        entries = self._redis.xrange(JOB + job_id + EVENTS, start, "+")
        return [
            (entry.decode(), _job(job_id, [fields.get(name.encode()) for name in JOB_FIELDS]))
            for entry, fields in entries
        ]

    @_reaching
    def unfinished(self) -> list[Unfinished]:
        with self._redis.pipeline(transaction=True) as pipe:
            running, waiting, usage, usage_at = (
                pipe.zrange(RUNNING, 0, -1).zrange(WAITING, 0, -1).hgetall(USAGE).hgetall(USAGE_AT).execute()
            )
        ids = [job_id.decode() for job_id in running + waiting]
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(JOB + job_id, ("status", "started", "controls", "owner", "created"))
            records = pipe.execute()
        queue = [
            Unfinished(
                job_id,
                JobStatus(status.decode()),
                started and float(started),
                json.loads(controls),
                (owner or b"").decode(),
                float(created),
            )
            for job_id, (status, started, controls, owner, created) in zip(ids, records, strict=True)
            if status is not None and status.decode() in (PENDING, IN_PROGRESS)
        ]
        kept = [(owner.decode(), float(seconds), float(usage_at.get(owner, 0))) for owner, seconds in usage.items()]
        return turn_order(queue, kept, self.speeds(), time.time())

    @_reaching
    def learn(self, size: str, work: float, seconds: float, turn_seconds: float | None = None) -> None:
        runs = runs_of(size, work, seconds, turn_seconds)
        self._learn(keys=[SPEEDS], args=[NEW_RUN_WEIGHT, *(part for key, run in runs for part in (key, repr(run)))])

    @_reaching
    def speeds(self) -> Speeds:
        return speeds_of({key.decode(): float(seconds) for key, seconds in self._redis.hgetall(SPEEDS).items()})

    @_reaching
    def live_workers(self) -> int:
        return int(self._workers(keys=[STREAM], args=[GROUP, int(self.lease * 1000), FORGET_WORKERS_MS]))

    @_reaching
    def input(self, job_id: str) -> tuple[bytes, str, dict[str, Any]] | None:
        image, digest, image_name, controls = self._redis.hmget(
            JOB + job_id, ("image", "image_hash", "image_name", "controls")
        )
        if digest is not None:
            image = self._redis.get(IMAGE + digest.decode())
        return None if image is None else (image, image_name.decode(), json.loads(controls))

    @_reaching
    def depth(self) -> QueueDepth:
        with self._redis.pipeline(transaction=True) as pipe:
            waiting, running, oldest = (
                pipe.zrange(WAITING, 0, -1).zrange(RUNNING, 0, -1).zrange(WAITING, 0, 0, withscores=True).execute()
            )
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in waiting + running:
                pipe.hget(JOB + job_id.decode(), "owner")
            owners = [(owner or b"").decode() for owner in pipe.execute()]
        by_owner: dict[str, tuple[int, int]] = {}
        for index, owner in enumerate(owners):
            counts = by_owner.get(owner, (0, 0))
            by_owner[owner] = (counts[0] + 1, counts[1]) if index < len(waiting) else (counts[0], counts[1] + 1)
        return QueueDepth(
            len(waiting), len(running), max(0.0, time.time() - oldest[0][1]) if oldest else 0.0, by_owner
        )

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
        self._retry(keys=[DELIVERIES, DELIVERY + delivery_id], args=[delivery_id, tries, repr(due)])

    @_reaching
    def delivered(self, delivery_id: str) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.zrem(DELIVERIES, delivery_id).delete(DELIVERY + delivery_id).execute()

    def reachable(self) -> bool:
        try:
            return bool(self._redis.ping())
        except (redis.ConnectionError, redis.TimeoutError):
            return False


def _job(job_id: str, values: list[bytes | None]) -> Job | None:
    """A job from its hash's JOB_FIELDS, or from one of its events; None when it has none."""
    status, created, started, finished, attempt, progress, error, error_status, *owner = values
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
        (owner[0] or b"").decode() if owner else "",
    )
