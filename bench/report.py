"""Results: the table every section adds rows to, the JSON file, and the machine they ran on."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import imageio_ffmpeg


@dataclass
class Row:
    measure: str
    value: str
    target: str = ""
    # None where the issue sets no target for the measure.
    met: bool | None = None


@dataclass
class Section:
    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: with a handful of samples it is one of them, not an interpolation."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def machine() -> dict[str, Any]:
    """What the figures depend on; the CPU model and core count matter most on a shared box."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    return {
        "cpu": models[0] if models else platform.processor(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gib": round(memory_kib / 2**20, 1),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "ffmpeg": imageio_ffmpeg.get_ffmpeg_version(),
        **{package: _version(package) for package in ("torch", "diffusers", "bentoml")},
    }


def _version(package: str) -> str | None:
    """None where it is not installed: GPU machines run `bench --gpu` without BentoML."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def table(sections: list[Section]) -> str:
    """A Markdown table, so the README can take it as printed."""
    lines = ["| section | measure | value | target | met |", "|---|---|---|---|---|"]
    for section in sections:
        for row in section.rows:
            met = "" if row.met is None else ("yes" if row.met else "**no**")
            lines.append(f"| {section.name} | {row.measure} | {row.value} | {row.target} | {met} |")
    return "\n".join(lines)


def write_json(
    path: Path, command: str, settings: dict[str, Any], info: dict[str, Any], seconds: float, sections: list[Section]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "command": command,
        # Every option, defaults included: the command line alone does not say what ran.
        "settings": settings,
        "machine": info,
        "seconds": round(seconds, 1),
        "sections": {section.name: asdict(section) for section in sections},
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
