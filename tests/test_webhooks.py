"""Webhooks: a job calls a receiver when it starts and ends, signed as Standard Webhooks says,
retried with the same id, kept across a restart, and never sent to a private address unasked.

The receiver is a real HTTP server on loopback, allowed through SVD_WEBHOOK_HOSTS; each
delivery is verified with the Standard Webhooks library, as a receiver would.
"""

from __future__ import annotations

import base64
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from standardwebhooks import Webhook

from harness import PHOTO, ROOT, SMALL, Server, decode_video, free_port, serve, wait_until
from svd.base.errors import BadInput
from svd.jobs.model import Webhook as Hook
from svd.jobs.sqlite import SQLiteJobs
from svd.jobs.webhooks.addresses import Unresolved, WebhookHosts, checked_address
from svd.jobs.webhooks.delivery import Deliverer, retry_delay
from svd.jobs.webhooks.events import END

SECRET = "whsec_" + base64.b64encode(b"a test secret of 32 bytes, long!").decode()


class Receiver:
    """Records every delivery; answers each with the next of `answers`, then 200."""

    def __init__(self, port: int, answers: list[int] | None = None):
        self.port = port
        self.answers = list(answers or [])
        self.deliveries: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.deliveries.append((dict(self.headers), body))
                    status = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def verified(self) -> list[tuple[str, dict]]:
        """(webhook-id, payload) of every delivery, each verified with the secret."""
        with self._lock:
            return [(headers["webhook-id"], Webhook(SECRET).verify(body, headers)) for headers, body in self.deliveries]

    def close(self) -> None:
        self.http.shutdown()
        self.http.server_close()


@contextmanager
def receiving(port: int, answers: list[int] | None = None) -> Iterator[Receiver]:
    receiver = Receiver(port, answers)
    try:
        yield receiver
    finally:
        receiver.close()


ENV = {"SVD_WEBHOOK_SECRET": SECRET, "SVD_WEBHOOK_HOSTS": "127.0.0.1"}


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with webhooks on, calling loopback receivers."""
    with serve(tmp_path_factory.mktemp("hooked"), ENV) as running:
        yield running


def _submit(server: Server, **data: str) -> httpx.Response:
    files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
    return httpx.post(f"{server.url}/generate_task/submit", files=files, data={**SMALL, **data}, timeout=60)


def _events(receiver: Receiver, task_id: str) -> list[tuple[str, dict]]:
    return [
        (delivery_id, payload) for delivery_id, payload in receiver.verified() if payload["data"]["task_id"] == task_id
    ]


class RawReceiver:
    """A plain socket server on loopback: reads each request whole, then lets `answer(connection,
    webhook_id)` write what it likes. Notes each connection's opening and closing, in order."""

    def __init__(self, answer):
        self.answer = answer
        self.events: list[tuple[str, str]] = []  # ("open" | "close", webhook-id)
        self._lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, body = data.split(b"\r\n\r\n", 1)
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
            headers = {name.lower(): value for name, value in headers.items()}
            while len(body) < int(headers.get("content-length", 0)):
                body += connection.recv(65536)
            webhook_id = headers["webhook-id"]
            self._note("open", webhook_id)
            try:
                self.answer(connection, webhook_id)
            except OSError:
                pass  # the sender closed the connection
            self._note("close", webhook_id)

    def _note(self, what: str, webhook_id: str) -> None:
        with self._lock:
            self.events.append((what, webhook_id))

    def tries(self, webhook_id: str) -> int:
        with self._lock:
            return sum(1 for what, seen in self.events if (what, seen) == ("close", webhook_id))

    def most_open_at_once(self, webhook_id: str) -> int:
        open_now = most = 0
        with self._lock:
            for what, seen in self.events:
                if seen == webhook_id:
                    open_now += 1 if what == "open" else -1
                    most = max(most, open_now)
        return most

    def close(self) -> None:
        self.server.close()


def _kept_delivery(store: SQLiteJobs, url: str) -> str:
    """A job with a webhook at `url` and its end event waiting in the store; the delivery's id."""
    job = store.submit(b"x", "a.png", {}, per_worker=100, hook=Hook(url))
    assert store.notify(job.id, END, b'{"type":"task.completed"}')
    return store._one("SELECT id FROM deliveries WHERE job_id = :id", id=job.id)[0]


def _pending(store: SQLiteJobs) -> int:
    return store._one("SELECT COUNT(*) FROM deliveries")[0]


# A whole answer: a trickling receiver that is cut off never gets to send all of it.
WHOLE_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Padding: " + b"p" * 40 + b"\r\n\r\n"


def _trickle(connection: socket.socket, webhook_id: str) -> None:
    """The answer a byte at a time, a fifth of a second apart, while the sender listens."""
    for index in range(len(WHOLE_ANSWER)):
        readable, _, _ = select.select([connection], [], [], 0.2)
        if readable and not connection.recv(1):
            raise ConnectionAbortedError("the sender closed the connection")
        connection.sendall(WHOLE_ANSWER[index : index + 1])
    raise AssertionError(f"{webhook_id}: the whole answer was sent, past the try's deadline")


def test_a_trickling_receiver_has_one_try_open_at_a_time_each_cut_at_its_deadline_and_others_still_get_theirs(
    tmp_path: Path,
):
    store = SQLiteJobs(tmp_path / "jobs.db")
    cut: list[str] = []
    slow = RawReceiver(lambda connection, webhook_id: _cut(connection, webhook_id) and cut.append(webhook_id))
    ids = [_kept_delivery(store, slow.url) for _ in range(3)]
    deliverer = Deliverer(store, SECRET, WebhookHosts.parse("127.0.0.1"), try_seconds=1.0, senders=2)
    deliverer.start()
    try:
        with receiving(free_port()) as fast:
            # Two senders, three trickling receivers' deliveries: the other job's still arrives.
            wait_until(lambda: all(slow.tries(webhook_id) >= 1 for webhook_id in ids), 60, 0.1, "slow tries")
            fast_id = _kept_delivery(store, fast.url)
            wait_until(lambda: fast.deliveries, 60, 0.1, "the other receiver's delivery")
            assert fast.deliveries[0][0]["webhook-id"] == fast_id
            wait_until(lambda: all(slow.tries(webhook_id) >= 2 for webhook_id in ids), 60, 0.1, "tries again")
    finally:
        deliverer.stop()
        slow.close()
    # Every try was cut by the sender before the receiver had sent its status line and headers,
    # and no delivery ever had two tries open at once.
    assert sorted(set(cut)) == sorted(ids) and len(cut) == sum(slow.tries(webhook_id) for webhook_id in ids)
    assert [slow.most_open_at_once(webhook_id) for webhook_id in ids] == [1, 1, 1]
    assert _pending(store) == 3, "cut tries are tried again"


def _cut(connection: socket.socket, webhook_id: str) -> bool:
    """Trickles the answer; True when the sender cut it off."""
    try:
        _trickle(connection, webhook_id)
    except ConnectionError:
        return True
    return False


# What the receiver says it will send after its 200: far more than the sender may hold.
HUGE = 400 * 2**20


def _huge(connection: socket.socket, webhook_id: str) -> None:
    """200, then a body of HUGE bytes, generated as it is sent, until the sender closes."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % HUGE)
    chunk = bytes(2**20)
    for _ in range(HUGE // len(chunk)):
        connection.sendall(chunk)


DELIVER_ONE = """
import resource, sys, time
from pathlib import Path
from svd.jobs.webhooks.addresses import WebhookHosts
from svd.jobs.webhooks.delivery import Deliverer
from svd.jobs.sqlite import SQLiteJobs

store = SQLiteJobs(Path(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
Deliverer(store, sys.argv[2], WebhookHosts.parse("127.0.0.1")).start()
deadline = time.monotonic() + 60
while store._one("SELECT COUNT(*) FROM deliveries")[0] and time.monotonic() < deadline:
    time.sleep(0.05)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before * 1024, after * 1024, store._one("SELECT COUNT(*) FROM deliveries")[0])
"""


def test_a_receiver_answering_200_with_a_huge_body_counts_once_and_the_senders_memory_stays_flat(tmp_path: Path):
    receiver = RawReceiver(_huge)
    try:
        webhook_id = _kept_delivery(SQLiteJobs(tmp_path / "jobs.db"), receiver.url)
        ran = subprocess.run(
            [sys.executable, "-c", DELIVER_ONE, str(tmp_path / "jobs.db"), SECRET],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert ran.returncode == 0, ran.stderr
        before, after, pending = map(int, ran.stdout.split())
        wait_until(lambda: receiver.tries(webhook_id) == 1, 30, 0.05, "the receiver done")
    finally:
        receiver.close()
    assert pending == 0 and receiver.tries(webhook_id) == 1, "delivered, once"
    assert after - before < 32 * 2**20, f"the sender's peak memory grew by {(after - before) / 2**20:.0f} MiB"


def test_a_delivery_whose_host_does_not_resolve_for_a_while_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    lookup = socket.getaddrinfo
    failures = []

    def down_once(host, *args, **kwargs):
        if not failures:
            failures.append(host)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return lookup(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", down_once)
    store = SQLiteJobs(tmp_path / "jobs.db")
    with receiving(free_port()) as receiver:
        webhook_id = _kept_delivery(store, receiver.url.replace("127.0.0.1", "localhost"))
        deliverer = Deliverer(store, SECRET, WebhookHosts.parse("localhost"))
        deliverer.start()
        try:
            wait_until(lambda: receiver.deliveries, 30, 0.1, "the delivery once the name resolves")
        finally:
            deliverer.stop()
    assert failures == ["localhost"] and receiver.deliveries[0][0]["webhook-id"] == webhook_id


def test_a_4xx_answer_is_final_and_a_429_is_tried_again_after_its_retry_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    answers = {"gone": [b"410 Gone"], "busy": [b"429 Too Many Requests\r\nRetry-After: 3", b"200 OK"]}

    def answer(connection: socket.socket, webhook_id: str) -> None:
        status = answers[kinds[webhook_id]].pop(0)
        connection.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\n\r\n")

    receiver = RawReceiver(answer)
    store = SQLiteJobs(tmp_path / "jobs.db")
    kinds = {_kept_delivery(store, receiver.url): kind for kind in answers}
    deliverer = Deliverer(store, SECRET, WebhookHosts.parse("127.0.0.1"))
    caplog.set_level("INFO", logger="bentoml.svd.jobs.webhooks.delivery")
    deliverer.start()
    try:
        wait_until(lambda: _pending(store) == 0, 30, 0.1, "both deliveries done")
    finally:
        deliverer.stop()
        receiver.close()
    gone, busy = kinds
    assert receiver.tries(gone) == 1 and f"{gone} for job" in caplog.text
    assert "given up after 1 tries: 410" in caplog.text
    assert "try 1 answered 429; next try in 3 s" in caplog.text and f"{busy} for job" in caplog.text
    assert receiver.tries(busy) == 2 and "delivered, try 2" in caplog.text


def test_a_lookup_that_hangs_is_given_up_at_its_deadline(monkeypatch: pytest.MonkeyPatch):
    answer = threading.Event()

    def hangs(*args, **kwargs):
        answer.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hangs)
    try:
        with pytest.raises(Unresolved, match="did not resolve within 0.2 s"):
            checked_address("https://hooks.example.com/", WebhookHosts(), lookup_seconds=0.2)
    finally:
        answer.set()


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.0.0.1/", "http://169.254.169.254/latest", "http://[::1]/",
            "http://[64:ff9b::a00:1]/", "http://[2002:a00:1::1]/", "http://[::ffff:0:a00:1]/", "http://[::ffff:10.0.0.1]/"]
)
def test_loopback_private_and_link_local_addresses_are_refused_by_default(url: str):
    with pytest.raises(BadInput, match="not a public address"):
        checked_address(url, WebhookHosts())


def test_only_http_and_https_and_the_allowed_hosts_and_networks_are_called():
    assert checked_address("https://8.8.8.8/hook", WebhookHosts()) == "8.8.8.8"
    with pytest.raises(BadInput, match="http or https"):
        checked_address("ftp://8.8.8.8/", WebhookHosts())
    with pytest.raises(BadInput, match="does not resolve"):
        checked_address("http://no-such-host.invalid/", WebhookHosts())
    assert checked_address("http://10.1.2.3/", WebhookHosts.parse("10.0.0.0/8, hooks.internal")) == "10.1.2.3"
    assert checked_address("http://localhost:8080/", WebhookHosts.parse("localhost")) in ("127.0.0.1", "::1")
    assert [retry_delay(tries) for tries in (1, 2, 3)] == [2, 4, 8]


def test_a_job_calls_its_webhook_signed_at_start_and_end_and_a_failed_try_is_retried_with_the_same_id(
    hooked: Server, tmp_path: Path
):
    server = hooked
    with receiving(free_port(), answers=[500]) as receiver:
        submitted = _submit(server, webhook=receiver.url, seed="7")
        assert submitted.status_code == 200, submitted.text
        task_id = submitted.json()["task_id"]
        events = wait_until(
            lambda: len(_events(receiver, task_id)) >= 3 and _events(receiver, task_id), 120, 0.2, "deliveries"
        )
        starts = [(delivery_id, payload) for delivery_id, payload in events if payload["type"] == "task.start"]
        ends = [(delivery_id, payload) for delivery_id, payload in events if payload["type"] == "task.completed"]
        # The first try was answered 500: the same delivery came again, with the same id.
        assert len(starts) == 2 and len(ends) == 1, [payload["type"] for _, payload in events]
        (first_id, first), (again_id, again) = starts
        (end_id, end) = ends[0]
        assert first_id == again_id and first_id.startswith("msg_") and end_id != first_id
        assert again["data"] == first["data"] == {"task_id": task_id, "status": "in_progress", "attempt": 1}
        data = end["data"]
        assert data["status"] == "completed" and data["error"] is None and data["seed"] == 7
        assert data["output_id"] == task_id and data["settings"]["num_frames"] == SMALL["num_frames"]
        assert set(data["stage_seconds"]) >= {"denoise", "decode"}
        video = httpx.get(f"{server.url}{data['output_path']}", timeout=60)
        (tmp_path / "video.mp4").write_bytes(video.content)
        assert len(decode_video(tmp_path / "video.mp4").frames) == SMALL["num_frames"]
        # Each try is signed anew: a wrong secret does not verify it.
        headers, body = receiver.deliveries[0]
        with pytest.raises(Exception, match="No matching signature"):
            Webhook("whsec_" + base64.b64encode(b"another secret of 32 bytes long!").decode()).verify(body, headers)
        # Logged once the answer is read, which may be after the receiver saw the request.
        wait_until(lambda: f"for job {task_id} delivered, try 2" in server.log_text(), 60, what="the delivery logged")
        assert "answered 500; next try in 2 s" in server.log_text()


def test_the_end_event_alone_when_filtered_and_refused_urls_are_400_naming_the_field(hooked: Server):
    server = hooked
    with receiving(free_port()) as receiver:
        task_id = _submit(server, webhook=receiver.url, webhook_events_filter="completed").json()["task_id"]
        wait_until(lambda: _events(receiver, task_id), 120, 0.2, "the end event")
        status = f"{server.url}/generate_task/status?task_id={task_id}"
        wait_until(lambda: httpx.get(status, timeout=30).json()["status"] == "completed", 60, 0.2, "the job done")
        assert [payload["type"] for _, payload in _events(receiver, task_id)] == ["task.completed"]
        for url, why in [
            ("http://10.1.2.3/hook", "not a public address"),
            ("http://[::1]:9/hook", "not a public address"),
            ("file:///etc/passwd", "http or https"),
            ("https://example.com/" + "a" * 2000, "2000"),
        ]:
            refused = _submit(server, webhook=url)
            assert refused.status_code == 400 and "webhook" in refused.json()["error"], refused.text
            assert why in refused.json()["error"], refused.text
        wrong = _submit(server, webhook=receiver.url, webhook_events_filter="stop")
        assert wrong.status_code == 400 and "webhook_events_filter" in wrong.json()["error"]


def test_a_delivery_pending_when_the_server_stops_is_sent_after_it_starts_again(tmp_path: Path):
    port = free_port()  # nobody listens there yet: every try fails
    with serve(tmp_path, ENV) as server:
        task_id = _submit(server, webhook=f"http://127.0.0.1:{port}/hook").json()["task_id"]
        wait_until(lambda: "next try in 4 s" in server.log_text(), 120, 0.2, "tries failing")
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(120)
    with receiving(port) as receiver, serve(tmp_path, ENV):
        events = wait_until(
            lambda: len(_events(receiver, task_id)) >= 2 and _events(receiver, task_id), 60, 0.2, "kept deliveries"
        )
        by_type = {payload["type"]: payload["data"] for _, payload in events}
        assert (
            sorted(by_type) == ["task.completed", "task.start"] and by_type["task.completed"]["status"] == "completed"
        )


def test_without_a_secret_the_server_sends_no_webhooks_and_says_so(server: Server):
    refused = _submit(server, webhook="https://8.8.8.8/hook")
    assert refused.status_code == 400 and "SVD_WEBHOOK_SECRET" in refused.json()["error"]
