"""GPU mode: the real model on CUDA at the default size, per stage, end to end and peak VRAM.

Run in-process, since peak VRAM (torch.cuda.max_memory_allocated) is only visible
from inside; the stages are the StageTimes the service sends as Server-Timing.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from bench.report import Row, Section
from svd.config import Settings
from svd.generate import StageTimes, VideoGenerator
from svd.images import prepare_image
from svd.loading import load_pipeline
from svd.params import GenerationParams
from tests.helpers import PHOTO

GIB = 2**30
# The service's defaults (1024x576, 25 frames, 25 steps) with a fixed seed.
DEFAULT = GenerationParams(seed=42)
CASES = {
    "decode_chunk_size 2": DEFAULT,
    "decode_chunk_size 8": replace(DEFAULT, decode_chunk_size=8),
    "decode_chunk_size 25": replace(DEFAULT, decode_chunk_size=25),
    "guidance off (max_guidance_scale 1), chunk 2": replace(DEFAULT, max_guidance_scale=1.0),
}


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench --gpu needs a CUDA GPU and the real model, and PyTorch here sees no GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU "
            "machine with a CUDA build of torch; the other sections run on CPU without --gpu."
        )


def run() -> Section:
    require_cuda()
    settings = Settings.from_env()
    model = load_pipeline(settings)
    generator = VideoGenerator(model)
    section = Section(
        "gpu",
        data={"model": settings.model_id, "device": torch.cuda.get_device_name(), "load_seconds": model.load_seconds},
    )
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        # Unmeasured and tiny: the first call pays for CUDA context and kernel loading.
        tiny = GenerationParams(width=64, height=64, num_frames=2, num_inference_steps=1, seed=0)
        generator.generate(Image.new("RGB", (64, 64)), tiny.resolve(model.max_frames), Path(tmp))
        for name, case in CASES.items():
            params = case.resolve(model.max_frames)
            times = StageTimes()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            with times.measure("prepare"):
                image = prepare_image(PHOTO, params.width, params.height, params.sizing, settings.max_pixels)
            result = generator.generate(image, params, Path(tmp), times)
            torch.cuda.synchronize()
            total = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() / GIB
            stages = {stage: round(seconds, 2) for stage, seconds in times.seconds.items()}
            section.data[name] = {
                "seconds": round(total, 2),
                "stages": stages,
                "peak_vram_gib": round(peak, 2),
                "decode_chunk_size_used": result.decode_chunk_size,
            }
            per_stage = ", ".join(f"{stage} {value:.1f} s" for stage, value in stages.items())
            section.rows.append(Row(name, f"{total:.1f} s end to end, {peak:.1f} GiB peak VRAM; {per_stage}"))
    return section
