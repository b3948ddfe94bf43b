"""Webhook delivery: a job calls back when it starts and when it ends, signed as Standard Webhooks says.

A delivery is kept in the job store from the moment its event happens until the receiver
answers 2xx, answers that it never will, or the tries run out, so a restart loses none.
Each worker runs a Deliverer thread that takes due deliveries from the store and tries a
few at once, so a slow or dead receiver never holds the GPU or a request thread. Every try
is signed anew (`webhook-id` stays, `webhook-timestamp` is the try's) with the Standard
Webhooks library, so receivers verify with any Standard Webhooks implementation.

Outbound requests are dangerous: every try goes only to an address svd/jobs/webhooks/addresses.py
admits, checked anew, with no redirects followed. A try has one deadline for all of it
(the lookup, connecting, sending, and the status line and headers of the answer), which
asyncio enforces whatever the receiver trickles; nothing past the headers is read. The
store holds a delivery for one sender for longer than a try can last, so one delivery
never has two tries open. The bodies are svd/jobs/webhooks/events.py's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime, timezone
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from svd.base.errors import BadInput
from svd.jobs.model import Delivery, StoreUnavailable
from svd.jobs.store import JobStore
from svd.jobs.webhooks.addresses import Unresolved, WebhookHosts, checked_address

logger = logging.getLogger(f"bentoml.{__name__}")

# Tries of one delivery, and the wait before the second; each later wait doubles, up to a
# cap: 2, 4, 8 ... seconds, about nine minutes in all.
TRIES = 9
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 300.0
# The whole of one try: lookup, connect, send, status line and headers.
TRY_SECONDS = 10.0
# A delivery being tried is not taken by another sender for this many tries' time: its try
# has ended, by its deadline, and its outcome is written long before.
HELD_TRIES = 3
SENDERS = 4
IDLE_POLL_SECONDS = 0.5
# Answers that say a later try may succeed; every other non-2xx answer is final.
RETRIED_STATUSES = frozenset({408, 429})


def retry_delay(tries: int, retry_after: float | None = None) -> float:
    """Seconds before the next try of a delivery tried `tries` times; at least what the
    receiver's Retry-After asked, within the cap."""
    backoff = min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (tries - 1))
    return min(MAX_RETRY_SECONDS, max(backoff, retry_after or 0.0))


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; its HTTP-date form is read as no wish."""
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None


class Outcome(NamedTuple):
    """How a try went: what the receiver answered, whether it took the delivery, whether a later
    try may do better, and the wait it asked for (Retry-After)."""

    answer: str
    sent: bool = False
    again: bool = False
    retry_after: float | None = None


class Deliverer:
    """Takes due deliveries from `store` and posts them, signed with `secret`, until told to stop;
    at most `senders` tries at once, each ended after `try_seconds`."""

    def __init__(
        self,
        store: JobStore,
        secret: str,
        allowed: WebhookHosts,
        try_seconds: float = TRY_SECONDS,
        senders: int = SENDERS,
    ):
        self.store = store
        self.signer = Webhook(secret)
        self.allowed = allowed
        self.try_seconds = try_seconds
        self.senders = senders
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="svd-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        free = asyncio.Semaphore(self.senders)
        trying: set[asyncio.Task] = set()
        async with httpx.AsyncClient(timeout=self.try_seconds, follow_redirects=False) as http:
            while not self._stopping.is_set():
                await free.acquire()
                try:
                    delivery = await asyncio.to_thread(self.store.next_delivery, HELD_TRIES * self.try_seconds)
                except StoreUnavailable as exc:  # deliveries wait in the store
                    logger.debug("SVD could not read the webhook deliveries: %s", exc)
                    delivery = None
                except Exception:
                    logger.exception("SVD could not read the webhook deliveries")
                    delivery = None
                if delivery is None:
                    free.release()
                    await asyncio.sleep(IDLE_POLL_SECONDS)
                    continue
                task = asyncio.create_task(self._send(http, delivery, free))
                trying.add(task)
                task.add_done_callback(trying.discard)

    async def _send(self, http: httpx.AsyncClient, delivery: Delivery, free: asyncio.Semaphore) -> None:
        try:
            outcome = await self._try(http, delivery)
            await asyncio.to_thread(self._record, delivery, outcome)
        except Exception:
            logger.exception("SVD webhook %s for job %s: the try failed", delivery.id, delivery.job_id)
        finally:
            free.release()

    async def _try(self, http: httpx.AsyncClient, delivery: Delivery) -> Outcome:
        try:
            async with asyncio.timeout(self.try_seconds):
                status, retry_after = await self.post(http, delivery)
        except Unresolved as exc:
            return Outcome(str(exc), again=True)
        except BadInput as refused:
            return Outcome(f"not sent: {refused}")
        except (httpx.HTTPError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.try_seconds:g} s"
            return Outcome(f"{type(exc).__name__}: {why}", again=True)
        again = status >= 500 or status in RETRIED_STATUSES
        return Outcome(str(status), 200 <= status < 300, again, retry_after)

    def _record(self, delivery: Delivery, outcome: Outcome) -> None:
        tries = delivery.tries + 1
        answer = outcome.answer
        if outcome.sent:
            self.store.delivered(delivery.id)
            logger.info("SVD webhook %s for job %s delivered, try %d", delivery.id, delivery.job_id, tries)
        elif not outcome.again or tries >= TRIES:
            self.store.delivered(delivery.id)
            logger.warning(
                "SVD webhook %s for job %s given up after %d tries: %s", delivery.id, delivery.job_id, tries, answer
            )
        else:
            delay = retry_delay(tries, outcome.retry_after)
            self.store.retry_delivery(delivery.id, tries, time.time() + delay)
            logger.info(
                "SVD webhook %s for job %s: try %d answered %s; next try in %.0f s",
                delivery.id,
                delivery.job_id,
                tries,
                answer,
                delay,
            )

    async def post(self, http: httpx.AsyncClient, delivery: Delivery) -> tuple[int, float | None]:
        """One signed try at the address checked now; the receiver's status and Retry-After,
        its body left unread."""
        address = await asyncio.to_thread(checked_address, delivery.url, self.allowed)
        parts = urlsplit(delivery.url)
        host = f"[{address}]" if ":" in address else address
        netloc = f"{host}:{parts.port}" if parts.port else host
        timestamp = datetime.now(timezone.utc)
        text = delivery.body.decode()
        headers = {
            "Host": parts.netloc.rsplit("@", 1)[-1],
            "Content-Type": "application/json",
            "User-Agent": "svd-webhooks",
            "webhook-id": delivery.id,
            "webhook-timestamp": str(int(timestamp.timestamp())),
            "webhook-signature": self.signer.sign(delivery.id, timestamp, text),
        }
        # The checked address, not a second lookup that could answer otherwise; TLS still checks the name.
        async with http.stream(
            "POST",
            urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
            content=delivery.body,
            headers=headers,
            extensions={"sni_hostname": parts.hostname} if parts.scheme == "https" else None,
        ) as response:
            # Closed unread: a receiver's body, of any size, never reaches this process's memory.
            return response.status_code, _retry_after(response.headers.get("Retry-After"))
