"""The GPU path on CPU: out-of-memory recovery through injected faults, memory release, modes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from svd.config import Settings
from svd.loading import load_pipeline
from tests.helpers import PHOTO, decode_video

TINY = {"width": 128, "height": 64, "num_frames": 8, "num_inference_steps": 3, "seed": 3}


@pytest.fixture
def unet_calls(service):
    calls: list[int] = []
    hook = service.engine.generator.model.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    yield calls
    hook.remove()


@pytest.fixture
def faults(service):
    generator = service.engine.generator
    yield generator.faults
    generator.faults.__init__()  # nothing left planned for the next test


def test_decode_out_of_memory_halves_the_chunk_without_denoising_again(
    call_service, faults, unet_calls, caplog: pytest.LogCaptureFixture
):
    faults.inject("decode", 2)
    with caplog.at_level(logging.WARNING, logger="bentoml.svd"):
        path, headers = call_service(image=PHOTO, **TINY, decode_chunk_size=4)
    assert headers["x-decode-chunk-size"] == "1"
    assert json.loads(headers["x-settings"])["decode_chunk_size"] == 1
    assert len(decode_video(path).frames) == 8, "every frame is in the video"
    assert len(unet_calls) == TINY["num_inference_steps"], "the denoising ran once"
    assert "decoding 4 frames at once; retrying with 2" in caplog.text
    assert "decoding 2 frames at once; retrying with 1" in caplog.text


def test_decode_out_of_memory_at_one_frame_is_a_503_and_the_next_request_works(call_service, faults):
    faults.inject("decode", 1)
    refused, headers = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert refused.status_code == 503
    assert int(headers["retry-after"]) >= 1
    assert "out of memory" in json.loads(refused.body)["error"]
    path, _ = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert len(decode_video(path).frames) == 8


def test_denoise_out_of_memory_is_a_503_with_retry_after_and_the_next_request_works(call_service, faults):
    faults.inject("denoise", 1)
    refused, headers = call_service(image=PHOTO, **TINY)
    assert refused.status_code == 503 and int(headers["retry-after"]) >= 1
    assert "while denoising" in json.loads(refused.body)["error"]
    path, headers = call_service(image=PHOTO, **TINY)
    assert headers["x-seed"] == "3" and len(decode_video(path).frames) == 8


def test_nothing_stays_referenced_after_a_failed_request(call_service, faults, service):
    """No latents or frames outlive a generation, successful or not: only the model's weights stay."""
    import gc

    pipe = service.engine.generator.model.pipe
    weights = {
        id(tensor)
        for module in (pipe.unet, pipe.vae, pipe.image_encoder)
        for tensor in [*module.parameters(), *module.buffers()]
    }

    def leftovers() -> list[tuple[int, ...]]:
        gc.collect()
        return [
            tuple(obj.shape)
            for obj in gc.get_objects()
            if isinstance(obj, torch.Tensor) and obj.numel() >= 1024 and id(obj) not in weights
        ]

    faults.inject("decode", 1)
    refused, _ = call_service(image=PHOTO, **TINY, decode_chunk_size=1)
    assert refused.status_code == 503
    assert leftovers() == []
    call_service(image=PHOTO, **TINY)
    assert leftovers() == []


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
    monkeypatch.setenv("SVD_COMPILE", "true")
    settings = Settings.from_env()
    assert (settings.memory, settings.forward_chunking, settings.compile) == ("model_offload", True, "inductor")
    monkeypatch.setenv("SVD_COMPILE", "aot_eager")
    assert Settings.from_env().compile == "aot_eager"
    monkeypatch.setenv("SVD_MEMORY", "half")
    with pytest.raises(ValueError, match="SVD_MEMORY='half'.*full, model_offload, sequential_offload"):
        Settings.from_env()


def test_compiled_unet_serves_new_sizes_without_recompiling_endlessly(tmp_path):
    """SVD_COMPILE with the aot_eager backend: dynamo's tracing and guards as on a GPU, without
    inductor's C++ build, which takes minutes on two CPU cores."""
    from torch._dynamo.utils import counters

    from svd.generate import VideoGenerator
    from svd.params import GenerationParams
    from svd.placement import COMPILE_CACHE_LIMIT

    counters.clear()
    settings = Settings(model_id="tiny", device="cpu", compile="aot_eager")
    generator = VideoGenerator(load_pipeline(settings))
    compiled = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    from PIL import Image

    shapes = [(64, 64, 2), (128, 64, 4), (192, 128, 4), (128, 128, 2)]
    graphs = []
    for width, height, frames in shapes:
        params = GenerationParams(width=width, height=height, num_frames=frames, num_inference_steps=1, seed=1)
        image = Image.open(PHOTO).convert("RGB").resize((width, height))
        result = generator.generate(image, params.resolve(25), tmp_path)
        assert len(decode_video(result.path).frames) == frames
        graphs.append(compiled())
    assert graphs[0] >= 1, "the UNet ran compiled"
    # Dynamo generalises to dynamic shapes after the first changes, then stops compiling.
    assert graphs[-1] == graphs[-2] <= COMPILE_CACHE_LIMIT, f"graphs after each request: {graphs}"


def test_gpu_check_without_a_gpu_runs_the_tiny_model_and_says_so(tmp_path, capsys, monkeypatch):
    from svd import gpu_check

    monkeypatch.delenv("SVD_MODEL_ID", raising=False)
    assert gpu_check.main(["--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("No CUDA GPU here: running the tiny test model on the CPU instead")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == "tiny" and report["peak_vram_gib"] is None
    assert set(report["stage_seconds"]) == {"prepare", "encode", "denoise", "decode", "video"}
    assert report["stage_seconds"]["denoise"] > 0 and report["video_bytes"] > 0
    assert report["settings"]["num_frames"] == 8
    assert "denoise s" in printed and json.loads(printed.strip().splitlines()[-1]) == report
