"""The GPU's turns: one generation at a time, in the order they asked.

A threading.Lock lets whoever grabs it first after a release go next, so the job
runner, which asks again the moment a job lets go, could overtake synchronous
requests that have waited for minutes. Here each waits for the ones before it.
"""

from __future__ import annotations

import threading
import time
from collections import deque


class Turns:
    """A lock granted first come, first served; any thread may release it (a turn is
    taken by the job runner and given back by the job it hands it to)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._waiting: deque[object] = deque()
        self._held = False

    def acquire(self) -> None:
        ticket = object()
        with self._changed:
            self._waiting.append(ticket)
            self._changed.wait_for(lambda: not self._held and self._waiting[0] is ticket)
            self._waiting.popleft()
            self._held = True

    def release(self) -> None:
        with self._changed:
            if not self._held:
                raise RuntimeError("release of a turn nobody holds")
            self._held = False
            self._changed.notify_all()

    def locked(self) -> bool:
        return self._held

    def __enter__(self) -> Turns:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class HandedTurn:
    """A turn already taken, handed to the one generation it was taken for: entering it takes
    nothing, leaving it gives the turn back; `given_back` tells the one who took it."""

    def __init__(self, turns: Turns) -> None:
        self._turns = turns
        self._lock = threading.Lock()
        self.given_back = threading.Event()
        # When it was given back (time.perf_counter()): how long a job held the GPU.
        self.given_back_at: float | None = None

    def __enter__(self) -> HandedTurn:
        return self

    def __exit__(self, *_: object) -> None:
        self.give_back()

    def give_back(self) -> None:
        """Once only, whether the generation ran or failed before it reached the GPU."""
        with self._lock:
            if self.given_back.is_set():
                return
            self._turns.release()
            self.given_back_at = time.perf_counter()
            self.given_back.set()
