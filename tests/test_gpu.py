"""The GPU tier: the real path on CUDA, in half precision, with the full-size architecture.

`pytest -m gpu` runs these on a machine with an NVIDIA GPU; elsewhere each is skipped
with a reason. They use the generation core only (no BentoML, no server), so a GPU
machine needs torch, diffusers, transformers, accelerate, pillow, numpy,
imageio-ffmpeg and pytest.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from harness import PHOTO, assert_browser_safe_mp4, decode_video
from svd.base.params import GenerationParams
from svd.base.settings import Settings
from svd.core.faults import Faults
from svd.core.generate import OutOfMemory, StageTimes, denoise, generate, warm_up, warm_up_params
from svd.core.loading import LoadedModel, load_pipeline

pytestmark = pytest.mark.gpu

SMALL = GenerationParams(width=256, height=128, num_frames=8, num_inference_steps=2, seed=0)
GIB = 2**30


def _model(model_id: str = "tiny", **settings) -> LoadedModel:
    return load_pipeline(Settings(model_id=model_id, device="cuda", **settings))


def _photo(params: GenerationParams) -> Image.Image:
    return Image.open(PHOTO).convert("RGB").resize((params.width, params.height))


def _generate(model: LoadedModel, params: GenerationParams, out_dir: Path, times: StageTimes | None = None):
    params = params.resolve(model.max_frames)
    result = generate(model, _photo(params), params, out_dir, times)
    video = decode_video(result.path)
    assert_browser_safe_mp4(video, params.width, params.height, params.num_frames)
    assert video.frames.std() > 1, "not one flat colour: no NaN or overflow"
    return result, video


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tiny_model_in_half_precision_on_cuda(dtype: str, tmp_path: Path):
    model = _model(dtype=dtype)
    _generate(model, SMALL, tmp_path)
    pipe = model.pipe
    assert {p.dtype for p in pipe.unet.parameters()} == {getattr(torch, dtype)}
    assert pipe.vae.dtype == getattr(torch, dtype), "the VAE is cast back after diffusers' float32 encode"
    assert next(pipe.unet.parameters()).device.type == "cuda"


@pytest.mark.parametrize("memory", ["full", "model_offload", "sequential_offload"])
def test_each_memory_mode_runs_and_its_stage_clocks_stop_when_the_gpu_is_done(memory: str, tmp_path: Path):
    model = _model(memory=memory)
    _generate(model, SMALL, tmp_path)
    params = SMALL.resolve(model.max_frames)
    times = StageTimes()
    torch.cuda.synchronize()
    start = time.perf_counter()
    denoise(model, _photo(params), params, times)
    # Nothing left queued on the GPU when the call (and so its last stage clock) returned: the
    # stream says so itself, however fast or slow the card and the host are.
    assert torch.cuda.current_stream().query(), "work was still queued on the GPU when the clock stopped"
    returned = time.perf_counter()
    assert times.seconds["encode"] > 0 and times.seconds["denoise"] > 0
    assert times.seconds["encode"] + times.seconds["denoise"] <= returned - start


@pytest.mark.parametrize("memory", ["full", "model_offload", "sequential_offload"])
def test_cached_steps_run_in_each_memory_mode(memory: str, tmp_path: Path):
    """The cached steps call the UNet's outer layers directly, past the offload hook on the UNet:
    under model_offload they rely on the whole pass before them having brought it to the GPU."""
    model = _model(memory=memory)
    _generate(model, replace(SMALL, num_inference_steps=4, cache_interval=3), tmp_path)


def test_compiled_model_is_warm_for_a_default_request(tmp_path: Path):
    """The warm-up compiles at the default shapes, every decode chunk length included."""
    from torch._dynamo.utils import counters

    counters.clear()
    model = _model(dtype="float16", compile="inductor")
    warm_up(model, warm_up_params(True, model.max_frames))
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 2, "the UNet and the VAE decoder ran compiled"
    _generate(model, GenerationParams(num_inference_steps=2, seed=0), tmp_path)
    assert counters["stats"]["unique_graphs"] == compiled, "a default request compiled again"


def test_out_of_memory_at_decode_gives_back_what_it_allocated(tmp_path: Path):
    """The fault strikes deep in the VAE decoder, after its activations are really allocated."""
    model = _model(dtype="float16")
    _generate(model, SMALL, tmp_path)
    weights = torch.cuda.memory_allocated()
    faults = Faults(model.pipe)
    faults.inject("decode", 2)
    result, video = _generate(model, replace(SMALL, decode_chunk_size=4), tmp_path)
    assert result.params.decode_chunk_size == 1 and len(video.frames) == 8
    assert torch.cuda.memory_allocated() == weights
    faults.inject("decode", 1)
    with pytest.raises(OutOfMemory, match="even one frame at a time") as failed:
        _generate(model, replace(SMALL, decode_chunk_size=1), tmp_path)
    assert failed.value.held_elsewhere < GIB, "nothing else on this GPU: a retry would fail the same way"
    assert torch.cuda.memory_allocated() == weights
    assert torch.cuda.memory_reserved() - weights < 64 * 2**20, "the cache was emptied after the failure"


def test_random_svd_xt_at_the_default_size_and_its_peak_vram_per_decode_chunk(tmp_path: Path):
    """The full-size architecture in float16, 1024x576 and 25 frames (2 steps: the bench times 25)."""
    model = _model("random-svd-xt")
    assert model.dtype == torch.float16
    peaks = {}
    for chunk in (2, 8, 25):
        torch.cuda.reset_peak_memory_stats()
        result, _ = _generate(model, GenerationParams(num_inference_steps=2, decode_chunk_size=chunk, seed=0), tmp_path)
        assert result.params.decode_chunk_size == chunk
        peaks[chunk] = torch.cuda.max_memory_allocated() / GIB
    print(json.dumps({"device": torch.cuda.get_device_name(), "peak_vram_gib_by_decode_chunk_size": peaks}))
    assert peaks[2] <= peaks[8] < peaks[25], peaks


def test_one_seed_gives_the_same_starting_noise_on_cpu_and_gpu():
    """The tutorial's torch.manual_seed is a CPU generator; a CUDA one would draw other noise."""
    params = SMALL.resolve(25)
    noise = {}
    for device in ("cpu", "cuda"):
        model = load_pipeline(Settings(model_id="tiny", device=device, dtype="float32"))
        seen: list[torch.Tensor] = []
        hook = model.pipe.unet.register_forward_pre_hook(
            lambda _module, args: seen.append(args[0][:, :, :4].float().cpu()) if not seen else None
        )
        try:
            denoise(model, _photo(params), params)
        finally:
            hook.remove()
        noise[device] = seen[0]
    assert torch.allclose(noise["cpu"], noise["cuda"], rtol=1e-4, atol=1e-5)

