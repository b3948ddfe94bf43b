"""Run the benchmarks side by side: `python -m bench` (all CPU sections, tiny model), `--quick`, `--gpu`.

Prints a Markdown table and writes every figure to JSON. The HTTP sections share
one fresh `bentoml serve` on loopback: cold start first, then memory (so its
first request is the server's first), serving overhead, and load.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.report import Section, machine, table, write_json
from harness import PHOTO, ROOT
from svd.base.params import CONTROLS

SECTIONS = (
    "encoding",
    "interpolation",
    "jobs",
    "preview",
    "replicas",
    "bucket",
    "roles",
    "coldstart",
    "memory",
    "serving",
    "load",
    "streams",
)
# The sections that share one server; replicas, roles and bucket start their own.
SERVER_SECTIONS = ("coldstart", "memory", "serving", "load", "streams")
# What --quick changes: enough to prove every section still runs, in well under a minute.
QUICK = {
    "encode_size": "256x144",
    "encode_frames": 5,
    "encode_repeats": 1,
    "imports": "svd.base.settings",
    "presets": "ultrafast",
    "crfs": "23",
    "runs": 1,
    "requests": 2,
    "clients": "1,2",
    "videos": 2,
    "level_seconds": 60.0,
    "jobs": 3,
    "preview_runs": 1,
    "preview_steps": 2,
    "replica_jobs": 2,
    "replica_steps": 1,
    "bucket_runs": 1,
    "streams": 5,
    "role_runs": 1,
}


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated, from: " + ", ".join(SECTIONS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes and counts: checks the bench runs, no figures")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="the configured model on CUDA instead: stages, end to end, VRAM (needs no BentoML)",
    )
    parser.add_argument(
        "--out", type=Path, help="JSON output (default: bench/results/latest.json; with --gpu, gpu-<device>.json)"
    )
    group = parser.add_argument_group("gpu")
    group.add_argument(
        "--cache-interval",
        type=_intervals,
        default="1,2,3,5",
        help="cache_interval values to time the default video at (1, the default video, is always timed)",
    )
    group = parser.add_argument_group("encoding")
    group.add_argument("--photo", type=Path, default=PHOTO, help="the photo the frames pan across")
    group.add_argument("--encode-size", default="1024x576", help="WIDTHxHEIGHT of the frames")
    group.add_argument("--encode-frames", type=int, default=25)
    group.add_argument("--encode-repeats", type=int, default=5, help="timed runs of each encoding; the median counts")
    group.add_argument("--presets", default="ultrafast,superfast,veryfast,faster,medium", help="x264 presets to sweep")
    group.add_argument("--crfs", default="16,18,20", help="libx264 CRFs to sweep with each preset")
    group = parser.add_argument_group("interpolation (on the encoding section's pan, size and frames)")
    group.add_argument("--factors", default="2,4", help="interpolation factors to measure")
    group = parser.add_argument_group("jobs (in-process, the tiny model and the service's job store and runner)")
    group.add_argument("--jobs", type=int, default=8, help="jobs queued and run one after another")
    group = parser.add_argument_group(
        "preview (in-process, the tiny model: generations with and without live previews)"
    )
    group.add_argument("--preview-runs", type=int, default=5, help="generations each way, alternating")
    group.add_argument("--preview-steps", type=int, default=50, help="denoising steps of each generation")
    group = parser.add_argument_group("bucket (a default video kept and served from a folder and from an S3 bucket)")
    group.add_argument("--bucket-runs", type=int, default=10, help="deliveries each way, alternating")
    group = parser.add_argument_group("replicas (one and two `bentoml serve` replicas on one redis-server queue)")
    group.add_argument("--replica-jobs", type=int, default=8, help="jobs submitted at once, each way")
    group.add_argument("--replica-steps", type=int, default=20, help="denoising steps of each job")
    group = parser.add_argument_group("roles (all against api + worker on one redis-server queue)")
    group.add_argument("--role-runs", type=int, default=5, help="synchronous requests each way; the median counts")
    group = parser.add_argument_group("server")
    group.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch threads for the server and the in-process model; 0: torch's default (one per core). "
        "On a shared machine more threads than free cores make every figure erratic",
    )
    group.add_argument("--imports", default="torch,service", help="coldstart: modules to time in a fresh interpreter")
    group.add_argument("--runs", type=int, default=5, help="serving: timed runs each way; the median counts")
    group.add_argument("--requests", type=int, default=30, help="memory: requests to sample RSS over")
    group.add_argument("--clients", default="1,2,4,8", help="load: concurrent clients per level")
    group.add_argument("--videos", type=int, default=8, help="load: videos per level, shared among the clients")
    group.add_argument("--streams", type=int, default=50, help="streams: clients following one job's events")
    group.add_argument("--level-seconds", type=float, default=240.0, help="load: no new requests after this per level")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == parser.get_default(name):
                setattr(args, name, value)
    args.sections = _names(args.sections)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {', '.join(sorted(unknown))}; use {', '.join(SECTIONS)}")
    return args


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _numbers(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def _intervals(text: str) -> list[int]:
    allowed = next(control.allowed for control in CONTROLS if control.name == "cache_interval")
    try:
        return [int(allowed(int(part))) for part in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: each must be {allowed}") from None


def run_cpu(args: argparse.Namespace) -> list[Section]:
    # Here, not above: these need BentoML and a server, which `--gpu` runs without.
    from bench import (
        bucket,
        coldstart,
        encoding,
        interpolation,
        jobs,
        load,
        memory,
        preview,
        replicas,
        roles,
        serving,
        streams,
    )
    from bench.server import QUICK_REQUEST, REQUEST, started

    sections: list[Section] = []
    request = QUICK_REQUEST if args.quick else REQUEST

    def done(section: Section, start: float) -> None:
        sections.append(section)
        print(f"[bench] {section.name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    width, height = (int(side) for side in args.encode_size.lower().split("x"))
    if "encoding" in args.sections:
        start = time.perf_counter()
        presets, crfs = _names(args.presets), _numbers(args.crfs)
        done(encoding.run(args.photo, width, height, args.encode_frames, args.encode_repeats, presets, crfs), start)
    if "interpolation" in args.sections:
        start = time.perf_counter()
        done(interpolation.run(args.photo, width, height, args.encode_frames, _numbers(args.factors)), start)
    if "jobs" in args.sections:
        start = time.perf_counter()
        done(jobs.run(request, args.jobs, args.torch_threads), start)
    if "preview" in args.sections:
        start = time.perf_counter()
        done(
            preview.run({**request, "num_inference_steps": args.preview_steps}, args.preview_runs, args.torch_threads),
            start,
        )
    if "replicas" in args.sections:
        start = time.perf_counter()
        replica_request = {**request, "num_inference_steps": args.replica_steps}
        done(replicas.run(replica_request, args.replica_jobs, args.torch_threads), start)
    if "bucket" in args.sections:
        start = time.perf_counter()
        done(bucket.run(args.photo, args.bucket_runs), start)
    if "roles" in args.sections:
        start = time.perf_counter()
        done(roles.run(request, args.role_runs, args.torch_threads), start)
    if not set(args.sections) & set(SERVER_SECTIONS):
        return sections
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp, started(Path(tmp), args.torch_threads) as (server, ready):
        if "coldstart" in args.sections:
            done(coldstart.run(server, ready, _names(args.imports)), start)
        for name, measure in (
            ("memory", lambda: memory.run(server, request, args.requests)),
            ("serving", lambda: serving.run(server, request, args.runs, args.torch_threads)),
            ("load", lambda: load.run(server, request, _numbers(args.clients), args.videos, args.level_seconds)),
            ("streams", lambda: streams.run(server, request, args.streams)),
        ):
            if name in args.sections:
                start = time.perf_counter()
                done(measure(), start)
    return sections


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    info = machine()
    start = time.perf_counter()
    if args.gpu:
        from bench import gpu
        from svd.base.settings import Settings

        sections = [gpu.run(args.cache_interval)]
        out = args.out or gpu.results_path(Settings.from_env())
    else:
        sections = run_cpu(args)
        out = args.out or ROOT / "bench" / "results" / "latest.json"
    seconds = time.perf_counter() - start
    command = shlex.join(["python", "-m", "bench", *argv])
    print(table(sections))
    load = ", ".join(f"{value:.1f}" for value in info["load_average_at_start"])
    print(f"\n{command}: {seconds:.0f} s on {info['nproc']} × {info['cpu']}; load average at start {load}")
    write_json(out, command, vars(args), info, seconds, sections)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
