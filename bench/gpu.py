"""GPU mode: the configured model on CUDA at the default size, per stage, end to end and peak VRAM.

    SVD_MODEL_ID=random-svd-xt python -m bench --gpu                   # no weights needed
    SVD_MODEL_ID=random-svd-xt SVD_COMPILE=1 python -m bench --gpu     # the same, compiled
    SVD_MODEL_ID=random-svd-xt python -m bench --gpu --cache-interval 3 # DeepCache at 1 and 3 only

Run in-process, since peak VRAM (torch.cuda.max_memory_allocated) is only visible
from inside; the stages are the StageTimes the service sends as Server-Timing,
synchronised with the GPU. Needs no BentoML. Writes bench/results/gpu-<device>.json
(gpu-<device>-compile.json when compiled).
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from bench.report import Row, Section
from harness import PHOTO
from svd.base.params import GenerationParams
from svd.base.settings import Settings
from svd.core.generate import StageTimes, generate, warm_up, warm_up_params
from svd.core.loading import LoadedModel, load_pipeline
from svd.media.images import prepare_image

GIB = 2**30
RESULTS = Path(__file__).resolve().parent / "results"
# The service's defaults (1024x576, 25 frames, 25 steps) with a fixed seed.
DEFAULT = GenerationParams(seed=42)
CASES = {
    "decode_chunk_size 2": DEFAULT,
    "decode_chunk_size 8": replace(DEFAULT, decode_chunk_size=8),
    "decode_chunk_size 25": replace(DEFAULT, decode_chunk_size=25),
    "guidance off (max_guidance_scale 1), chunk 2": replace(DEFAULT, max_guidance_scale=1.0),
}
# DeepCache's intervals timed at the default size; interval 1 is the default video above.
CACHE_INTERVALS = (1, 2, 3, 5)
# What emptying the CUDA cache after a request costs the next one: a per-request
# cost, so two steps show it as well as twenty-five.
SHORT = replace(DEFAULT, num_inference_steps=2)


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench --gpu needs a CUDA GPU, and PyTorch here sees none "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). Run it on a GPU "
            "machine with a CUDA build of torch; the other sections run on CPU without --gpu."
        )


def results_path(settings: Settings) -> Path:
    """bench/results/gpu-<device>.json, for example gpu-nvidia-h100-80gb-hbm3.json."""
    device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return RESULTS / f"gpu-{device}{'-compile' if settings.compile else ''}.json"


def run(cache_intervals: Sequence[int] = CACHE_INTERVALS) -> Section:
    """The cases above, and the default video at each of `cache_intervals`."""
    require_cuda()
    settings = Settings.from_env()
    model = load_pipeline(settings)
    section = Section(
        "gpu",
        data={
            "model": settings.model_id,
            "device": torch.cuda.get_device_name(),
            "dtype": str(model.dtype).removeprefix("torch."),
            "memory_mode": settings.memory,
            "compile": settings.compile or "off",
            "load_seconds": round(model.load_seconds, 2),
        },
    )
    # Unmeasured: the first call pays for the CUDA context, kernel loading and, compiled, compiling.
    start = time.perf_counter()
    warm_up(model, warm_up_params(bool(settings.compile), model.max_frames))
    section.data["warm_up_seconds"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name, case in CASES.items():
            _measure(section, name, model, case, settings, Path(tmp))
        intervals = [interval for interval in cache_intervals if interval != 1]
        for interval in intervals:
            _measure(
                section,
                f"cache_interval {interval}",
                model,
                replace(DEFAULT, cache_interval=interval),
                settings,
                Path(tmp),
            )
        _compare_intervals(section, intervals)
        _measure(section, "2 steps, CUDA cache kept", model, SHORT, settings, Path(tmp))
        torch.cuda.empty_cache()
        _measure(section, "2 steps, after torch.cuda.empty_cache()", model, SHORT, settings, Path(tmp))
    return section


def _measure(
    section: Section, name: str, model: LoadedModel, case: GenerationParams, settings: Settings, out_dir: Path
) -> None:
    params = case.resolve(model.max_frames)
    times = StageTimes()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with times.measure("prepare"):
        image = prepare_image(PHOTO, params.width, params.height, params.sizing, settings.max_pixels)
    result = generate(model, image, params, out_dir, times)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / GIB
    stages = {stage: round(seconds, 2) for stage, seconds in times.seconds.items()}
    section.data[name] = {
        "seconds": round(total, 2),
        "stages": stages,
        "peak_vram_gib": round(peak, 2),
        "reserved_gib": round(torch.cuda.memory_reserved() / GIB, 2),
        "decode_chunk_size_used": result.params.decode_chunk_size,
    }
    per_stage = ", ".join(f"{stage} {value:.1f} s" for stage, value in stages.items())
    section.rows.append(Row(name, f"{total:.1f} s end to end, {peak:.1f} GiB peak VRAM; {per_stage}"))


def _compare_intervals(section: Section, intervals: Sequence[int]) -> None:
    """Denoising seconds at each interval, and as a share of interval 1's: what DeepCache saves."""
    full = section.data["decode_chunk_size 2"]["stages"]["denoise"]
    by_interval = {1: full, **{k: section.data[f"cache_interval {k}"]["stages"]["denoise"] for k in intervals}}
    section.data["denoise_seconds_by_cache_interval"] = by_interval
    text = ", ".join(f"{k}: {seconds:.1f} s ({seconds / full:.2f}x)" for k, seconds in by_interval.items())
    section.rows.append(Row("denoise by cache_interval", text))
