"""Cold start: from launching `bentoml serve` to /readyz 200, split into its parts.

From outside: the total, and when the arbiter spawned the worker (process start
times in /proc). From inside: what the service logs about loading and warming
up, and import times measured in a fresh interpreter the way a worker imports.
The parts overlap (the service may load while the server starts), so they need
not add up to the total.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from bench.report import Row, Section
from bench.server import workers
from harness import ROOT, Server

# The service logs "... loaded in 0.3 s, warmed up in 5.7 s" once ready; older versions
# only "Loaded ... in 0.3 s". Missing figures are reported as such, not guessed.
LOADED = re.compile(r"loaded .*?in ([\d.]+) s", re.IGNORECASE)
WARMED = re.compile(r"warmed up in ([\d.]+) s", re.IGNORECASE)


def import_seconds(module: str) -> float:
    """Seconds a fresh interpreter spends importing `module` (the page cache is warm by now)."""
    code = f"import time; start = time.perf_counter(); import {module}; print(time.perf_counter() - start)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "SVD_MODEL_ID": "tiny"},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return float(result.stdout.split()[-1])


def start_seconds(pid: int) -> float:
    """When a process started, in seconds since boot (field 22 of /proc/PID/stat)."""
    # The command name in field 2 may hold spaces; everything after its ')' is space-separated.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _logged(pattern: re.Pattern[str], log: str) -> float | None:
    match = pattern.search(log)
    return float(match.group(1)) if match else None


def run(server: Server, ready_seconds: float, modules: list[str]) -> Section:
    spawned = min(start_seconds(pid) for pid in workers(server)) - start_seconds(server.process.pid)
    log = server.log_text()
    loaded, warmed = _logged(LOADED, log), _logged(WARMED, log)
    imports = {module: import_seconds(module) for module in modules}

    def seconds(value: float | None) -> str:
        return "not logged" if value is None else f"{value:.1f} s"

    return Section(
        "coldstart",
        rows=[
            Row("`bentoml serve` to /readyz 200 (±0.5 s poll)", seconds(ready_seconds)),
            Row("arbiter: CLI and import of service.py, until it spawns the worker", seconds(spawned)),
            Row("worker: spawn to ready", seconds(ready_seconds - spawned)),
            *(Row(f"  import {module} (fresh interpreter)", seconds(value)) for module, value in imports.items()),
            Row("  model build (service log)", seconds(loaded)),
            Row("  warm-up before ready (service log)", seconds(warmed)),
        ],
        data={
            "ready_seconds": round(ready_seconds, 2),
            "worker_spawned_after_seconds": round(spawned, 2),
            "import_seconds": {module: round(value, 2) for module, value in imports.items()},
            "model_build_seconds": loaded,
            "warm_up_seconds": warmed,
        },
    )
