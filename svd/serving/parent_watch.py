"""A worker ends when the server that started it dies.

BentoML's workers run in sessions of their own, so a SIGKILL of `bentoml serve` (the
out-of-memory killer, `kill -9`) leaves them running with parent 1: holding the port,
the model, the GPU's memory and the job store, and colliding with the next start.
Linux sends this process SIGKILL the moment its parent dies (PR_SET_PDEATHSIG);
elsewhere a thread notices within a second.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(f"bentoml.{__name__}")

PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.5


def end_with_parent() -> None:
    """From now on, this process ends when its parent does."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL) == 0:
            # The parent may have died before the call: then nobody will send the signal.
            if os.getppid() != parent:
                os._exit(1)
            return
        logger.warning(
            "SVD could not ask to end with the server (prctl: errno %d); watching it instead", ctypes.get_errno()
        )
    threading.Thread(target=_watch, args=(parent,), name="svd-lifeline", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    logger.error("SVD worker %d: the server that started it is gone; exiting", os.getpid())
    os._exit(1)
