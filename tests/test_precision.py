"""Half precision on the CPU: SVD_DTYPE, and the service path in float16 and bfloat16.

This is where the GPU path's dtype handling shows without a GPU: the VAE's
force_upcast, latents against the VAE's dtype, the conversion to uint8.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from harness import PHOTO, ROOT, assert_browser_safe_mp4, decode_video, serve
from svd.base.settings import ConfigError, Settings
from svd.core.loading import resolve_dtype


def test_svd_dtype_comes_from_the_environment_and_auto_is_float16_only_on_cuda(monkeypatch: pytest.MonkeyPatch):
    assert Settings.from_env().dtype == "auto"
    assert resolve_dtype(Settings(), torch.device("cpu")) == torch.float32
    assert resolve_dtype(Settings(), torch.device("cuda")) == torch.float16
    for name in ("float16", "bfloat16", "float32"):
        monkeypatch.setenv("SVD_DTYPE", name.upper())
        settings = Settings.from_env()
        assert (
            resolve_dtype(settings, torch.device("cpu"))
            == resolve_dtype(settings, torch.device("cuda"))
            == getattr(torch, name)
        )
    monkeypatch.setenv("SVD_DTYPE", "half")
    with pytest.raises(ConfigError, match="SVD_DTYPE='half'.*auto, float16, bfloat16, float32"):
        Settings.from_env()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_the_tiny_model_serves_valid_videos_in_half_precision(dtype: str, tmp_path: Path):
    with serve(tmp_path, env={"SVD_DTYPE": dtype}) as server:
        assert f"device cpu, dtype {dtype}, memory full" in server.log_text(), "the startup log names the dtype"
        files = {"image": ("rocket.jpg", PHOTO.read_bytes(), "image/jpeg")}
        data = {"width": 64, "height": 64, "num_frames": 2, "num_inference_steps": 2, "seed": 11}
        videos = []
        for attempt in ("first", "again"):
            response = httpx.post(f"{server.url}/generate", files=files, data=data, timeout=300)
            assert response.status_code == 200, response.text
            (tmp_path / f"{attempt}.mp4").write_bytes(response.content)
            videos.append(decode_video(tmp_path / f"{attempt}.mp4"))
        log = server.log_text()
    # The service's lines, not library noise: at start, and twice per half-precision request.
    assert "requires torchvision (not installed)" not in log and "should be kept in float32" not in log
    assert "SVD ready" in log, "the filters drop those lines only"
    assert_browser_safe_mp4(videos[0], 64, 64, 2)
    assert videos[0].frames.std() > 1, "not one flat colour: no NaN or overflow"
    # diffusers runs a float16 VAE's encoder in float32 (force_upcast) and casts it back; a VAE
    # left in float32 by the first request would decode the replay differently.
    assert np.array_equal(videos[0].frames, videos[1].frames), "a seed replays in half precision too"


def test_a_bad_dtype_stops_the_start_naming_the_variable(tmp_path: Path):
    env = {**os.environ, "SVD_DTYPE": "fp8", "BENTOML_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "bentoml", "serve", "service:StableDiffusionVideo", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode != 0
    assert (
        "SVD_DTYPE='fp8' is not allowed; use one of: auto, float16, bfloat16, float32." in result.stdout + result.stderr
    )
