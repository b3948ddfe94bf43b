"""Where the pipeline's weights live and how they run: memory modes and speed options."""

from __future__ import annotations

import logging

import torch
from diffusers import StableVideoDiffusionPipeline

from svd.base.settings import Settings

logger = logging.getLogger(f"bentoml.{__name__}")

def place(pipe: StableVideoDiffusionPipeline, settings: Settings, device: torch.device, dtype: torch.dtype):
    """Put the pipeline on its device in the configured memory mode, with the speed options on."""
    if pipe.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    offloading = device.type == "cuda" and settings.memory != "full"
    if settings.memory != "full" and not offloading:
        logger.warning(
            "SVD_MEMORY=%s offloads GPU memory to the CPU; on the CPU there is nothing to "
            "offload, so the model runs with everything in memory.",
            settings.memory,
        )
    if settings.memory == "model_offload" and offloading:
        pipe.enable_model_cpu_offload(gpu_id=device.index)
    elif settings.memory == "sequential_offload" and offloading:
        pipe.enable_sequential_cpu_offload(gpu_id=device.index)
    else:
        # Built-in models are made where they run; moving again would only warn.
        if pipe.device != device:
            pipe = pipe.to(device)
        if device.type == "cuda":
            # Convolutions in NHWC run on tensor cores without layout shuffles.
            pipe.unet.to(memory_format=torch.channels_last)
    if settings.forward_chunking:
        pipe.unet.enable_forward_chunking()
    if settings.compile:
        # Recompiling for every new size would stall requests for minutes (diffusers #10317):
        # dynamo compiles the first size statically and, on the first change, once more with
        # dynamic shapes; past its cache_size_limit (8) it runs eagerly instead.
        pipe.unet = torch.compile(pipe.unet, backend=settings.compile)
        if device.type == "cuda":
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend=settings.compile)
    return pipe
