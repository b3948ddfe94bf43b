"""SVD pipelines built in code with random weights: the tiny test model and the full-size SVD and SVD-XT.

Every component has the real class and wiring of Stable Video Diffusion, so shapes,
code paths and files are real while the video is noise. The full-size ones have
the published architectures (the hub's config.json files), so a GPU can be tested
and benchmarked without the 4.5 GB download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

WEIGHTS_SEED = 0
# Given to the image encoder's CLIPVisionConfig; the hub's image_encoder/config.json.
_VIT_H_14 = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "projection_dim": 1024,
    "num_hidden_layers": 32,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
# The hub's vae/config.json; everything else is AutoencoderKLTemporalDecoder's default.
_SVD_VAE = {
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "latent_channels": 4,
    "sample_size": 768,
}
_TINY_EMBED = 32


@dataclass(frozen=True)
class Architecture:
    """Constructor arguments of the three networks; what is not given is the class default."""

    unet: dict[str, Any]
    vae: dict[str, Any] = field(default_factory=lambda: dict(_SVD_VAE))
    image_encoder: dict[str, Any] = field(default_factory=lambda: dict(_VIT_H_14))


ARCHITECTURES: dict[str, Architecture] = {
    # The UNet is diffusers' UNetSpatioTemporalConditionModel default (the hub's
    # unet/config.json) but for the frames it was trained on.
    "random-svd-xt": Architecture(unet={"sample_size": 96, "num_frames": 25}),
    "random-svd": Architecture(unet={"sample_size": 96, "num_frames": 14}),
    # Narrow enough to run a request in seconds on two CPU cores: attention only in
    # the lowest-resolution block (over a full-size latent grid it makes a random
    # SVD crawl); four VAE levels keep the real scale factor of 8, and 32 channels
    # is the narrowest its 32-group normalisation allows.
    "tiny": Architecture(
        unet={
            "sample_size": 96,
            "down_block_types": ("DownBlockSpatioTemporal",) * 2 + ("CrossAttnDownBlockSpatioTemporal",),
            "up_block_types": ("CrossAttnUpBlockSpatioTemporal",) + ("UpBlockSpatioTemporal",) * 2,
            "block_out_channels": (32, 32, 64),
            "addition_time_embed_dim": _TINY_EMBED,
            "projection_class_embeddings_input_dim": 3 * _TINY_EMBED,
            "layers_per_block": 1,
            "cross_attention_dim": _TINY_EMBED,
            "num_attention_heads": (2, 2, 4),
            "num_frames": 25,
        },
        vae={
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "block_out_channels": (32, 32, 32, 32),
            "layers_per_block": 1,
            "latent_channels": 4,
        },
        image_encoder={
            "hidden_size": _TINY_EMBED,
            "intermediate_size": 37,
            "projection_dim": _TINY_EMBED,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
    ),
}


def build_pipeline(
    name: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> StableVideoDiffusionPipeline:
    """The named architecture with random weights made on `device` in `dtype`, identical on every call.

    The networks are built on the meta device, so no time goes into an fp32
    initialisation that is thrown away; each weight is then made once, where it runs.
    """
    pipe = build_empty_pipeline(name)
    pool = _UniformPool(torch.device(device))
    for network in (pipe.unet, pipe.vae, pipe.image_encoder):
        _materialise(network, torch.device(device), dtype, pool)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_empty_pipeline(name: str) -> StableVideoDiffusionPipeline:
    """The named architecture with its weights on the meta device: shapes only, no memory."""
    architecture = ARCHITECTURES[name]
    # Buffers stay real (CLIP's position ids, for one): only parameters go to meta.
    with init_empty_weights(include_buffers=False):
        unet = UNetSpatioTemporalConditionModel(**architecture.unet)
        vae = AutoencoderKLTemporalDecoder(**architecture.vae)
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**architecture.image_encoder))
    return StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=svd_xt_scheduler(),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}),
    )


def svd_xt_scheduler() -> EulerDiscreteScheduler:
    """SVD-XT's own scheduler configuration (the hub's scheduler/scheduler_config.json)."""
    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )


def parameter_count(network: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in network.parameters())


class _UniformPool:
    """Uniform values in [-1, 1), drawn once and dealt out in turn, wrapping around.

    Drawing 2.3 billion values one by one from a seeded generator takes half a
    minute on two CPU cores; scaling slices of one pool is bound by memory speed.
    """

    SIZE = 2**24

    def __init__(self, device: torch.device):
        generator = torch.Generator(device).manual_seed(WEIGHTS_SEED)
        values = torch.empty(self.SIZE, device=device).uniform_(-1.0, 1.0, generator=generator)
        self._values = values.repeat(2)  # any window up to SIZE long is one slice
        self._offset = 0
        self.device = device

    def take(self, count: int) -> torch.Tensor:
        start = self._offset
        self._offset = (start + count) % self.SIZE
        if count <= self.SIZE:
            return self._values[start : start + count]
        return self._values[: self.SIZE].repeat(-(-count // self.SIZE))[:count]


def _materialise(network: torch.nn.Module, device: torch.device, dtype: torch.dtype, pool: _UniformPool) -> None:
    """Give every meta parameter real values with PyTorch's default scales, then move the buffers."""
    for module in network.modules():
        for name, parameter in list(module._parameters.items()):
            if parameter is not None and parameter.is_meta:
                value = _initial_value(module, name, parameter, dtype, pool)
                module._parameters[name] = torch.nn.Parameter(value, requires_grad=False)
    # nn.Module.to, not diffusers' override, which warns about every cast it sees.
    torch.nn.Module.to(network, device=device, dtype=dtype)
    network.eval()


def _initial_value(
    module: torch.nn.Module, name: str, parameter: torch.Tensor, dtype: torch.dtype, pool: _UniformPool
) -> torch.Tensor:
    """PyTorch's default scales: matrices and kernels, and the biases beside them, are uniform
    within 1/sqrt(fan_in), as nn.Linear and nn.Conv make them; a 1-d weight is a
    normalisation's scale (1); any other vector, such as the VAE's blend factors, is 0."""
    weight = module._parameters.get("weight")
    scale_like = weight if name == "bias" and weight is not None and weight.dim() >= 2 else parameter
    if scale_like.dim() >= 2:
        bound = scale_like[0].numel() ** -0.5
        return pool.take(parameter.numel()).mul(bound).to(dtype).view(parameter.shape)
    return torch.full(parameter.shape, 1.0 if name == "weight" else 0.0, device=pool.device, dtype=dtype)
