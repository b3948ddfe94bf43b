"""Model loading: the hub model, a local diffusers directory, or a model built in code."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import StableVideoDiffusionPipeline

from svd.base.settings import Settings
from svd.core.placement import place


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


@dataclass
class LoadedModel:
    pipe: StableVideoDiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    source: str
    load_seconds: float

    @property
    def max_frames(self) -> int:
        """Frames the UNet was trained for: 25 for SVD-XT, 14 for SVD."""
        return int(self.pipe.unet.config.num_frames)


def resolve_device(settings: Settings) -> torch.device:
    """The device to run on, refusing a real model without CUDA unless CPU was asked for."""
    has_cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not has_cuda:
        raise ModelLoadError(
            "SVD_DEVICE=cuda was set but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
            "Install a CUDA build of torch and check `nvidia-smi`, or set SVD_DEVICE=cpu."
        )
    if settings.device == "auto" and not has_cuda and not settings.is_tiny:
        raise ModelLoadError(
            f"No CUDA GPU found, so {settings.model_id} will not be loaded: Stable Video "
            "Diffusion XT needs an NVIDIA GPU with 16 GB of memory or more (fp16, "
            f"decode_chunk_size 2), and PyTorch here (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'no'}) sees none. Run on a GPU machine with a CUDA build "
            "of torch; or set SVD_MODEL_ID=tiny for a smoke run with the tiny test model "
            "(its videos are noise); or set SVD_DEVICE=cpu to run the real model on the CPU "
            "anyway (hours per video)."
        )
    if settings.device == "cpu" or not has_cuda:
        return torch.device("cpu")
    # BentoML shows every worker all the GPUs: each takes its own.
    return torch.device("cuda", (settings.worker - 1) % torch.cuda.device_count())


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """SVD_DTYPE, where auto is float16 on CUDA, as the tutorial runs it, and float32 on the CPU."""
    if settings.dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, settings.dtype)


def load_pipeline(settings: Settings, locate: Callable[[], str] | None = None) -> LoadedModel:
    """Load the configured pipeline onto its device in its dtype (see resolve_dtype).

    `locate` returns where the weights are when BentoML fetches them (into a
    Bento's model store or the hub cache); by default the setting itself.
    """
    start = time.perf_counter()
    device = resolve_device(settings)
    if device.type == "cuda":
        # Also where CUDA puts its context and anything made without a device.
        torch.cuda.set_device(device)
    dtype = resolve_dtype(settings, device)
    if settings.is_built_in:
        from svd.core.architectures import build_pipeline

        source = "built in code, random weights"
        # Offloading starts on the CPU and moves each model to the GPU while it runs.
        pipe = build_pipeline(settings.model_id, device if settings.memory == "full" else "cpu", dtype)
    else:
        with explained_failures(settings):
            source = locate() if locate else settings.model_id
            pipe = _from_pretrained(settings, source, dtype)
    pipe = place(pipe, settings, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    return LoadedModel(pipe, device, dtype, source, time.perf_counter() - start)


def _from_pretrained(settings: Settings, source: str, dtype: torch.dtype) -> StableVideoDiffusionPipeline:
    is_local = os.path.isdir(source)
    if not is_local and not settings.is_hub_model:
        raise ModelLoadError(
            f"Model directory {source!r} does not exist. Set SVD_MODEL_ID to a directory in the "
            "diffusers layout (with model_index.json), a hub id such as "
            "stabilityai/stable-video-diffusion-img2vid-xt, or a built-in model: 'tiny', "
            "'random-svd-xt' or 'random-svd'."
        )
    return StableVideoDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, variant="fp16", revision=None if is_local else settings.revision
    )


@contextmanager
def explained_failures(settings: Settings) -> Iterator[None]:
    """Turn the hub's and diffusers' loading errors into one message naming the model and the fix."""
    try:
        yield
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(_explain(settings, exc)) from exc


def _explain(settings: Settings, exc: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = settings.model_id
    # diffusers re-raises the hub's errors as plain OSErrors: look down the chain.
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    kinds = tuple(type(error) for error in chain)
    text = " ".join(str(error) for error in chain)
    if any(issubclass(kind, GatedRepoError) for kind in kinds):
        return (
            f"{name} is gated: accept its licence at https://huggingface.co/{name} with your "
            "account, then set HF_TOKEN to an access token of that account."
        )
    if any(issubclass(kind, RepositoryNotFoundError) for kind in kinds):
        return (
            f"{name} was not found on the Hugging Face hub (or it is private and HF_TOKEN is "
            "missing or lacks access). Check SVD_MODEL_ID and HF_TOKEN."
        )
    if any(issubclass(kind, RevisionNotFoundError) for kind in kinds):
        return f"{name} has no revision {settings.revision!r}; check SVD_MODEL_REVISION."
    offline = any(issubclass(kind, (LocalEntryNotFoundError, ConnectionError)) for kind in kinds)
    if offline or "not fully cached locally" in text or "connect" in text.lower():
        return (
            f"{name} could not be downloaded and is not in the local cache: no network, or "
            "HF_HUB_OFFLINE=1 is set. Connect this machine, or download it once elsewhere with "
            f"`hf download {name} --include '*fp16*' '*.json' --local-dir DIR`, copy DIR here and "
            "set SVD_MODEL_ID=DIR; or set SVD_MODEL_ID=tiny for a smoke run."
        )
    if "fp16" in text or "variant" in text:
        return (
            f"{name} has no fp16 weights (files named *.fp16.safetensors), which this service "
            "loads. Save them with `pipe.save_pretrained(DIR, variant='fp16')` and set "
            f"SVD_MODEL_ID=DIR. ({exc})"
        )
    return (
        f"{name} could not be loaded: {exc}. SVD_MODEL_ID must be a hub id, a directory in the "
        "diffusers layout (model_index.json, unet/, vae/, image_encoder/, scheduler/, "
        "feature_extractor/), or a built-in model: 'tiny', 'random-svd-xt' or 'random-svd'."
    )
