"""The loader: the real from_pretrained path, the no-GPU refusal and the clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from svd.base.settings import DEFAULT_MODEL_ID, ConfigError, Settings
from svd.core.architectures import build_pipeline
from svd.core.loading import ModelLoadError, load_pipeline


@pytest.fixture(scope="module")
def hub_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline saved as the hub repo is laid out, fp16 variant files included."""
    directory = tmp_path_factory.mktemp("svd-hub-layout")
    build_pipeline("tiny").save_pretrained(directory, variant="fp16")
    return directory


def _latents(pipe) -> torch.Tensor:
    from PIL import Image

    image = Image.new("RGB", (128, 64), (200, 120, 40))
    return pipe(
        image, width=128, height=64, num_frames=3, num_inference_steps=1,
        generator=torch.Generator().manual_seed(0), output_type="latent",
    ).frames


def test_hub_layout_loads_through_the_real_path(hub_layout: Path):
    assert sorted(p.name for p in (hub_layout / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"
    ]
    loaded = load_pipeline(Settings(model_id=str(hub_layout), device="cpu"))
    assert loaded.source == str(hub_layout)
    assert loaded.device.type == "cpu" and loaded.dtype == torch.float32
    assert loaded.max_frames == 25
    assert type(loaded.pipe.unet).__name__ == "UNetSpatioTemporalConditionModel"
    assert loaded.pipe.vae_scale_factor == 8
    # fp16 weights upcast on CPU: close to the fp32 original, not identical.
    tiny = load_pipeline(Settings(model_id="tiny", device="cpu"))
    ours, reference = _latents(loaded.pipe), _latents(tiny.pipe)
    assert ours.shape == reference.shape == (1, 3, 4, 8, 16)
    assert np.allclose(ours.numpy(), reference.numpy(), atol=0.05)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a GPU, also where there is one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_real_model_without_a_gpu_is_refused_with_one_clear_paragraph(no_gpu):
    with pytest.raises(ModelLoadError) as refused:
        load_pipeline(Settings(model_id=DEFAULT_MODEL_ID))
    message = str(refused.value)
    assert "No CUDA GPU" in message and "SVD_MODEL_ID=tiny" in message and "SVD_DEVICE=cpu" in message
    assert "\n" not in message


def test_cuda_asked_for_without_one_is_refused(no_gpu):
    with pytest.raises(ModelLoadError, match="SVD_DEVICE=cuda"):
        load_pipeline(Settings(model_id="tiny", device="cuda"))


def test_a_local_directory_with_the_gpu_check_passed_still_needs_the_device(hub_layout: Path, no_gpu):
    with pytest.raises(ModelLoadError, match="No CUDA GPU"):
        load_pipeline(Settings(model_id=str(hub_layout)))


def test_missing_directory_names_it_and_the_fix(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model.*does not exist.*SVD_MODEL_ID"):
        load_pipeline(Settings(model_id=str(missing), device="cpu"))


def test_directory_without_fp16_weights_says_so(tmp_path: Path):
    build_pipeline("tiny").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no fp16 weights"):
        load_pipeline(Settings(model_id=str(tmp_path), device="cpu"))


def test_unreachable_hub_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=f"{DEFAULT_MODEL_ID} could not be downloaded"):
        load_pipeline(Settings(model_id=DEFAULT_MODEL_ID, device="cpu"))


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVD_MODEL_ID", "tiny")
    monkeypatch.setenv("SVD_DEVICE", "CPU")
    settings = Settings.from_env()
    assert settings.is_tiny and settings.device == "cpu" and not settings.is_hub_model
    monkeypatch.setenv("SVD_DEVICE", "tpu")
    with pytest.raises(ConfigError, match="SVD_DEVICE='tpu'.*auto, cuda, cpu"):
        Settings.from_env()
    monkeypatch.delenv("SVD_MODEL_ID")
    monkeypatch.delenv("SVD_DEVICE")
    assert Settings.from_env().model_id == DEFAULT_MODEL_ID and Settings.from_env().is_hub_model
