"""Webhook delivery: a job calls back when it starts and when it ends, signed as Standard Webhooks says.

A delivery is kept in the job store from the moment its event happens until the receiver
answers 2xx or the tries run out, so a restart loses none. Each worker runs a Deliverer
thread that takes due deliveries from the store and posts them from a small pool of its
own, so a slow or dead receiver never holds the GPU or a request thread. Every try is
signed anew (`webhook-id` stays, `webhook-timestamp` is the try's) with the Standard
Webhooks library, so receivers verify with any Standard Webhooks implementation.

Outbound requests are dangerous: every try goes only to an address svd/jobs/addresses.py
admits, checked anew, with no redirects followed. The bodies are svd/jobs/events.py's.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from urllib.parse import urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from svd.base.errors import BadInput
from svd.jobs.addresses import WebhookHosts, checked_address
from svd.jobs.model import Delivery
from svd.jobs.store import JobStore

logger = logging.getLogger(f"bentoml.{__name__}")

# Tries of one delivery, and the wait before the second; each later wait doubles, up to a
# cap: 2, 4, 8 ... seconds, about nine minutes in all.
TRIES = 9
FIRST_RETRY_SECONDS = 2.0
MAX_RETRY_SECONDS = 300.0
TIMEOUT_SECONDS = 10.0
# A delivery being sent is not taken by another worker for this long.
SENDING_LEASE_SECONDS = 2 * TIMEOUT_SECONDS
SENDERS = 4
IDLE_POLL_SECONDS = 0.5


def retry_delay(tries: int) -> float:
    """Seconds before the next try of a delivery tried `tries` times."""
    return min(MAX_RETRY_SECONDS, FIRST_RETRY_SECONDS * 2 ** (tries - 1))


class Deliverer:
    """Takes due deliveries from `store` and posts them, signed with `secret`, until told to stop."""

    def __init__(self, store: JobStore, secret: str, allowed: WebhookHosts):
        self.store = store
        self.signer = Webhook(secret)
        self.allowed = allowed
        self._http = httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False)
        self._stopping = threading.Event()
        self._senders = ThreadPoolExecutor(SENDERS, thread_name_prefix="svd-webhook")
        self._free = threading.Semaphore(SENDERS)
        self._thread = threading.Thread(target=self._loop, name="svd-webhooks", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._free.acquire()
            try:
                delivery = self.store.next_delivery(SENDING_LEASE_SECONDS)
            except Exception as exc:  # the store unreachable: deliveries wait in it
                logger.debug("SVD could not read the webhook deliveries: %s", exc)
                delivery = None
            if delivery is None:
                self._free.release()
                self._stopping.wait(IDLE_POLL_SECONDS)
                continue
            self._senders.submit(self._send, delivery)

    def _send(self, delivery: Delivery) -> None:
        try:
            self._try(delivery)
        except Exception:
            logger.exception("SVD webhook %s for job %s: the try failed", delivery.id, delivery.job_id)
        finally:
            self._free.release()

    def _try(self, delivery: Delivery) -> None:
        tries = delivery.tries + 1
        try:
            answer = self.post(delivery)
        except BadInput as refused:
            logger.warning("SVD webhook %s for job %s not sent: %s", delivery.id, delivery.job_id, refused)
            self.store.delivered(delivery.id)
            return
        except httpx.HTTPError as exc:
            answer = f"{type(exc).__name__}: {exc}"
        if isinstance(answer, int) and 200 <= answer < 300:
            self.store.delivered(delivery.id)
            logger.info("SVD webhook %s for job %s delivered, try %d", delivery.id, delivery.job_id, tries)
        elif tries >= TRIES:
            self.store.delivered(delivery.id)
            logger.warning(
                "SVD webhook %s for job %s given up after %d tries: %s", delivery.id, delivery.job_id, tries, answer
            )
        else:
            delay = retry_delay(tries)
            self.store.retry_delivery(delivery.id, tries, time.time() + delay)
            logger.info(
                "SVD webhook %s for job %s: try %d answered %s; next try in %.0f s",
                delivery.id,
                delivery.job_id,
                tries,
                answer,
                delay,
            )

    def post(self, delivery: Delivery) -> int:
        """One signed try at the address checked now; the receiver's status."""
        address = checked_address(delivery.url, self.allowed)
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
        response = self._http.post(
            urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
            content=delivery.body,
            headers=headers,
            extensions={"sni_hostname": parts.hostname} if parts.scheme == "https" else None,
        )
        return response.status_code
