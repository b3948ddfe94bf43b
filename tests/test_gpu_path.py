"""The GPU path on CPU: out-of-memory recovery through injected faults, memory release, modes."""

from __future__ import annotations

import gc
import json
import logging

import pytest
import torch
from PIL import Image

from harness import PHOTO, decode_video
from svd.base.settings import Settings
from svd.core.loading import load_pipeline

TINY = {"width": 128, "height": 64, "num_frames": 8, "num_inference_steps": 3, "seed": 3}


@pytest.fixture
def unet_calls(service):
    calls: list[int] = []
    hook = service.engine.model.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


@pytest.fixture
def faults(service):
    yield service.engine.faults
    service.engine.faults.clear()  # nothing left planned for the next test


def test_decode_out_of_memory_halves_the_chunk_without_denoising_again(
    call_service, faults, unet_calls, caplog: pytest.LogCaptureFixture
):
    faults.inject("decode", 2)
    with caplog.at_level(logging.WARNING, logger="bentoml.svd"):
        path, headers = call_service(image=PHOTO, **TINY, decode_chunk_size=4)
    assert json.loads(headers["x-settings"])["decode_chunk_size"] == 1
    assert len(decode_video(path).frames) == 8, "every frame is in the video"
    assert len(unet_calls) == TINY["num_inference_steps"], "the denoising ran once"
    assert "decoding 4 frames at once; retrying with 2" in caplog.text
    assert "decoding 2 frames at once; retrying with 1" in caplog.text


def test_decode_out_of_memory_at_one_frame_alone_on_the_gpu_is_a_422_saying_what_to_lower(call_service, faults):
    """Nothing else holds GPU memory (the CPU has none), so a retry would fail the same way: no Retry-After."""
    faults.inject("decode", 1)
    refused, headers = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert refused.status_code == 422 and "retry-after" not in headers
    error = json.loads(refused.body)["error"]
    assert "decoding even one frame at a time" in error
    assert all(field in error for field in ("width and height", "num_frames", "decode_chunk_size"))
    path, _ = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert len(decode_video(path).frames) == 8


def test_denoise_out_of_memory_alone_on_the_gpu_is_a_422_and_the_next_request_works(call_service, faults):
    faults.inject("denoise", 1)
    refused, headers = call_service(image=PHOTO, **TINY)
    assert refused.status_code == 422 and "retry-after" not in headers
    assert "while denoising" in json.loads(refused.body)["error"]
    path, headers = call_service(image=PHOTO, **TINY)
    assert headers["x-seed"] == "3" and len(decode_video(path).frames) == 8


def test_out_of_memory_while_other_processes_hold_the_gpu_is_a_503_with_retry_after(
    call_service, faults, monkeypatch: pytest.MonkeyPatch
):
    """Another process holding gigabytes may free them: worth a retry, as the batch client does on 503."""
    from svd.core import generate

    monkeypatch.setattr(generate, "memory_held_elsewhere", lambda device: 6 * 2**30)
    faults.inject("denoise", 1)
    refused, headers = call_service(image=PHOTO, **TINY)
    assert refused.status_code == 503 and int(headers["retry-after"]) >= 1
    assert "other processes hold 6.0 GiB" in json.loads(refused.body)["error"]


def test_encode_out_of_memory_leaves_the_float16_vae_in_float16(tmp_path):
    """diffusers upcasts a float16 VAE with force_upcast to float32 for the image encode and casts
    it back afterwards; an out-of-memory in between used to leave it float32 for good."""
    from svd.base.params import GenerationParams
    from svd.core.faults import Faults
    from svd.core.generate import OutOfMemory, generate

    model = load_pipeline(Settings(model_id="tiny", device="cpu", dtype="float16"))
    assert model.pipe.vae.config.force_upcast and model.pipe.vae.dtype == torch.float16
    Faults(model.pipe).inject("encode", 1)
    params = GenerationParams(width=64, height=64, num_frames=2, num_inference_steps=1, seed=0).resolve(25)
    with pytest.raises(OutOfMemory, match="while encoding the image"):
        generate(model, Image.new("RGB", (64, 64)), params, tmp_path)
    assert model.pipe.vae.dtype == torch.float16


def test_memory_is_released_only_once_the_failed_call_s_tensors_are_dropped(
    call_service, faults, service, monkeypatch: pytest.MonkeyPatch
):
    """A failure's traceback holds the activations of the call that failed: releasing inside the
    except block freed nothing. At each release only the weights and the latents may be alive."""
    from svd.core import generate

    weights = _weights(service.engine.model.pipe)
    release = generate.release_memory
    alive_at_release: list[list[tuple[int, ...]]] = []

    def spy(model, **kwargs) -> None:
        alive_at_release.append(_leftovers(weights))
        release(model, **kwargs)

    monkeypatch.setattr(generate, "release_memory", spy)
    faults.inject("decode", 2)  # decode 4 frames, then 2 fail; 1 at a time works
    path, _ = call_service(image=PHOTO, **TINY, decode_chunk_size=4)
    assert len(decode_video(path).frames) == 8
    faults.inject("denoise", 1)
    refused, _ = call_service(image=PHOTO, **TINY)
    assert refused.status_code == 422
    latent_shapes = {(8, 4, 8, 16), (1, 8, 4, 8, 16)}
    assert len(alive_at_release) == 4, alive_at_release
    for alive in alive_at_release:
        assert set(alive) <= latent_shapes, f"activations alive at release: {alive}"


def _weights(pipe) -> set[int]:
    return {
        id(tensor)
        for module in (pipe.unet, pipe.vae, pipe.image_encoder)
        for tensor in [*module.parameters(), *module.buffers()]
    }


def _leftovers(weights: set[int]) -> list[tuple[int, ...]]:
    """Shapes of the tensors of 1024 values or more that are alive and not the model's."""
    gc.collect()
    return [
        tuple(obj.shape)
        for obj in gc.get_objects()
        if isinstance(obj, torch.Tensor) and obj.numel() >= 1024 and id(obj) not in weights
    ]


def test_nothing_stays_referenced_after_a_failed_request(call_service, faults, service):
    """No latents or frames outlive a generation, successful or not: only the model's weights stay."""
    weights = _weights(service.engine.model.pipe)
    faults.inject("decode", 1)
    refused, _ = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert refused.status_code == 422
    assert _leftovers(weights) == []
    call_service(image=PHOTO, **TINY)
    assert _leftovers(weights) == []


@pytest.mark.parametrize("memory", ["model_offload", "sequential_offload"])
def test_offload_modes_on_cpu_say_so_and_run(memory: str, caplog: pytest.LogCaptureFixture):
    settings = Settings(model_id="tiny", device="cpu", memory=memory, forward_chunking=True)
    with caplog.at_level(logging.WARNING, logger="bentoml.svd"):
        model = load_pipeline(settings)
    assert f"SVD_MEMORY={memory}" in caplog.text and "nothing to offload" in caplog.text
    from PIL import Image

    frames = model.pipe(
        Image.new("RGB", (128, 64)), width=128, height=64, num_frames=2, num_inference_steps=1, output_type="latent"
    ).frames
    assert frames.shape == (1, 2, 4, 8, 16)


def test_memory_modes_and_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVD_MEMORY", "model_offload")
    monkeypatch.setenv("SVD_FORWARD_CHUNKING", "1")
    settings = Settings.from_env()
    assert (settings.memory, settings.forward_chunking, settings.compile) == ("model_offload", True, "")
    monkeypatch.setenv("SVD_MEMORY", "full")
    monkeypatch.setenv("SVD_COMPILE", "true")
    assert Settings.from_env().compile == "inductor"
    monkeypatch.setenv("SVD_COMPILE", "aot_eager")
    assert Settings.from_env().compile == "aot_eager"
    monkeypatch.setenv("SVD_MEMORY", "half")
    with pytest.raises(ValueError, match="SVD_MEMORY='half'.*full, model_offload, sequential_offload"):
        Settings.from_env()


@pytest.mark.parametrize("memory", ["model_offload", "sequential_offload"])
def test_compile_with_offloading_is_refused_at_start_naming_both(memory: str, monkeypatch: pytest.MonkeyPatch):
    """accelerate's offload hooks would sit inside the compiled graph and be wrapped again on every call."""
    monkeypatch.setenv("SVD_MEMORY", memory)
    monkeypatch.setenv("SVD_COMPILE", "1")
    with pytest.raises(ValueError, match=f"SVD_COMPILE cannot be combined with SVD_MEMORY={memory}"):
        Settings.from_env()


def test_compiled_unet_is_warmed_at_the_default_shapes_and_stops_recompiling(tmp_path):
    """SVD_COMPILE with the aot_eager backend: dynamo's tracing and guards as on a GPU, without
    inductor's C++ build, which takes minutes on two CPU cores.

    The warm-up used to run at 64x64 with 2 frames, so the first default request paid for
    compiling inside its deadline."""
    from torch._dynamo.utils import counters

    from svd.base.params import GenerationParams
    from svd.core.generate import denoise, generate
    from svd.serving.engine import Engine

    counters.clear()
    engine = Engine(Settings(model_id="tiny", device="cpu", compile="aot_eager"))
    assert engine.wait_ready(600), engine.state.message
    model = engine.model
    graphs = [counters["stats"]["unique_graphs"]]
    assert graphs[0] >= 1, "the warm-up ran the UNet compiled"
    default = GenerationParams(num_inference_steps=1, seed=1).resolve(model.max_frames)
    image = Image.open(PHOTO).convert("RGB").resize((default.width, default.height))
    latents = denoise(model, image, default)
    assert latents.shape == (1, 25, 4, 72, 128)
    assert counters["stats"]["unique_graphs"] == graphs[0], "a default request compiles nothing new"
    for width, height, frames in [(128, 64, 4), (192, 128, 2)]:
        params = GenerationParams(width=width, height=height, num_frames=frames, num_inference_steps=1, seed=1)
        result = generate(model, image.resize((width, height)), params.resolve(25), tmp_path)
        assert len(decode_video(result.path).frames) == frames
        graphs.append(counters["stats"]["unique_graphs"])
    # Dynamo recompiles once at the first new shape, with dynamic shapes, and the next new shape
    # runs that graph. Equal counts alone would also show a dynamo that gave up at its recompile
    # limit and ran eagerly: the recompile must have happened, well under the limit.
    limit = torch._dynamo.config.cache_size_limit
    assert graphs[1] > graphs[0], f"no recompile for the first new shape: {graphs}"
    assert graphs[2] == graphs[1] < limit, f"graphs after each request: {graphs}"


def test_gpu_check_without_a_gpu_runs_the_tiny_model_and_says_so(tmp_path, capsys, monkeypatch):
    from svd.tools import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SVD_MODEL_ID", raising=False)
    monkeypatch.delenv("SVD_DEVICE", raising=False)
    assert gpu_check.main(["--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("No CUDA GPU here: running the tiny test model on the CPU instead")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "tiny" and report["peak_vram_gib"] is None
    assert set(report["stage_seconds"]) == {"prepare", "encode", "denoise", "decode", "interpolate", "video"}
    assert report["stage_seconds"]["denoise"] > 0 and report["video_bytes"] > 0
    assert report["settings"]["num_frames"] == 8
    assert "denoise s" in printed and json.loads(printed.strip().splitlines()[-1]) == report
