"""Where the pipeline's weights live and how they run: memory modes and speed options."""

from __future__ import annotations

import logging

import torch
from diffusers import StableVideoDiffusionPipeline

from svd.config import Settings

logger = logging.getLogger("bentoml.svd")

# Recompiling for every new size would stall requests for minutes (diffusers
# #10317). Dynamo compiles the first size statically and, on the first change,
# once more with dynamic shapes; past this many graphs it runs eagerly instead.
COMPILE_CACHE_LIMIT = 8


def place(pipe: StableVideoDiffusionPipeline, settings: Settings, device: torch.device, dtype: torch.dtype):
    """Put the pipeline on its device in the configured memory mode, with the speed options on."""
    if pipe.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    if device.type != "cuda":
        if settings.memory != "full":
            logger.warning(
                "SVD_MEMORY=%s offloads GPU memory to the CPU; on the CPU there is nothing to "
                "offload, so the model runs with everything in memory.",
                settings.memory,
            )
        pipe = pipe.to(device)
    elif settings.memory == "model_offload":
        pipe.enable_model_cpu_offload()
    elif settings.memory == "sequential_offload":
        pipe.enable_sequential_cpu_offload()
    else:
        pipe = pipe.to(device)
        # Convolutions in NHWC run on tensor cores without layout shuffles.
        pipe.unet.to(memory_format=torch.channels_last)
    if settings.forward_chunking:
        pipe.unet.enable_forward_chunking()
    if settings.compile:
        torch._dynamo.config.cache_size_limit = COMPILE_CACHE_LIMIT
        pipe.unet = torch.compile(pipe.unet, backend=settings.compile)
        if device.type == "cuda":
            pipe.vae.decoder = torch.compile(pipe.vae.decoder, backend=settings.compile)
    return pipe
