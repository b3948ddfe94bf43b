"""Run once on a GPU machine: load the configured model, make one default video, report.

    python -m svd.tools.gpu_check [--json results.json] [--full]
        [--width W --height H --num-frames N --num-inference-steps S]
                            [--cache-interval K]

Prints the device, dtype, each network's parameters, the seconds of each stage,
peak memory and the settings, as a table and as JSON. Without a CUDA GPU (and
without SVD_DEVICE=cpu) it runs the tiny model on the CPU, small, and says so.
`SVD_MODEL_ID=random-svd-xt` checks the full-size architecture without its weights.
Needs no BentoML: only torch, diffusers, transformers, accelerate, pillow, numpy
and imageio-ffmpeg.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from PIL import Image

from svd.base.params import GenerationParams
from svd.base.settings import Settings
from svd.core.architectures import parameter_count
from svd.core.generate import StageTimes, generate
from svd.core.loading import load_pipeline
from svd.media.images import fit

PHOTO = Path(__file__).resolve().parents[2] / "assets" / "rocket.jpg"
SMALL = GenerationParams(width=256, height=128, num_frames=8, num_inference_steps=2, seed=0)


def run(settings: Settings, params: GenerationParams) -> dict:
    """Load, generate once, and measure; returns the report as a dict."""
    on_gpu = torch.cuda.is_available() and settings.device != "cpu"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    model = load_pipeline(settings)
    params = params.resolve(model.max_frames)
    image = fit(Image.open(PHOTO).convert("RGB"), params.width, params.height)
    times = StageTimes()
    with tempfile.TemporaryDirectory() as out_dir:
        start = time.perf_counter()
        result = generate(model, image, params, Path(out_dir), times)
        total = time.perf_counter() - start
        size = result.path.stat().st_size
    pipe = model.pipe
    return {
        "device": torch.cuda.get_device_name() if on_gpu else f"CPU ({platform.processor() or platform.machine()})",
        "model": settings.model_id,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": {
            "unet": parameter_count(pipe.unet),
            "vae": parameter_count(pipe.vae),
            "image_encoder": parameter_count(pipe.image_encoder),
        },
        "memory_mode": settings.memory,
        "compile": settings.compile or "off",
        "load_seconds": round(model.load_seconds, 2),
        "stage_seconds": {stage: round(seconds, 3) for stage, seconds in times.seconds.items()},
        "generate_seconds": round(total, 2),
        "peak_vram_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "decode_chunk_size_used": result.params.decode_chunk_size,
        "video_bytes": size,
        "settings": asdict(params),
        "torch": torch.__version__,
    }


def table(report: dict) -> str:
    nested = ("parameters", "stage_seconds", "settings")
    rows = [(key, value) for key, value in report.items() if key not in nested]
    rows += [(f"  {network} parameters", f"{count:,}") for network, count in report["parameters"].items()]
    rows += [(f"  {stage} s", seconds) for stage, seconds in report["stage_seconds"].items()]
    rows += [(f"  {key}", value) for key, value in report["settings"].items()]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m svd.tools.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    parser.add_argument("--full", action="store_true", help="on the CPU too, the full default video (minutes)")
    for name in ("width", "height", "num_frames", "num_inference_steps", "cache_interval"):
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, help=f"{name} of the video (default: the service's)")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    params = GenerationParams(seed=0)
    if not torch.cuda.is_available() and settings.device != "cpu":
        print("No CUDA GPU here: running the tiny test model on the CPU instead (its video is noise).")
        settings = replace(settings, model_id="tiny", device="cpu")
        params = params if args.full else SMALL
    chosen = {field.name: getattr(args, field.name, None) for field in fields(GenerationParams)}
    chosen = {name: value for name, value in chosen.items() if value is not None}
    report = run(settings, replace(params, **chosen))
    print(table(report))
    print(json.dumps(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
