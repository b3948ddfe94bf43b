"""DeepCache for SVD's UNet: most denoising steps reuse the deep features of the last full pass.

The idea is DeepCache (Ma, Fang and Wang, "DeepCache: Accelerating Diffusion Models for
Free", CVPR 2024): a UNet's deep features change little from one step to the next, while
its outermost layers, on the skip connections nearest the input and output, are a small
part of the work. Every `interval`-th step runs the whole UNet and keeps the output of the
last up block's first layer; the steps in between run only conv_in, the first down block's
layers up to the one before its last, the last up block's later layers on the kept feature,
and conv_out. For SVD that is the split the authors chose for it (their `cache_branch=0`),
with their uniform schedule.

Their package (`DeepCache` 0.1.1, 2023) has an SVD pipeline that no longer imports with the
diffusers pinned here, and its generic helper splits SVD's UNet as Stable Diffusion's and
keeps every block's output between steps; diffusers' own caches hook transformer blocks,
which this UNet has not. So the split is ours, installed for one denoising with diffusers'
HookRegistry and removed with everything it kept when the denoising ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNetSpatioTemporalConditionModel
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

HOOK = "svd_deep_cache"


class DeepCache(ModelHook):
    """Stands in for the UNet's forward: the whole UNet every `interval` calls, its outer layers otherwise."""

    def __init__(self, unet: UNetSpatioTemporalConditionModel, interval: int = 2):
        super().__init__()
        self.unet = unet
        self.interval = interval
        self.calls = 0
        self.deep: torch.Tensor | None = None

    def keep(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        self.deep = output[0] if isinstance(output, tuple) else output

    def new_forward(
        self,
        module: torch.nn.Module,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        added_time_ids: torch.Tensor,
        return_dict: bool = True,
    ) -> Any:
        full = self.calls % self.interval == 0
        self.calls += 1
        if full:
            # A compiled UNet would not see the hook that keeps the deep feature: run the eager one.
            forward = self.unet if module is not self.unet else self.fn_ref.original_forward
            return forward(sample, timestep, encoder_hidden_states, added_time_ids, return_dict=return_dict)
        sample = outer_layers(self.unet, self.deep, sample, timestep, encoder_hidden_states, added_time_ids)
        return UNetSpatioTemporalConditionOutput(sample=sample) if return_dict else (sample,)


@contextmanager
def deep_cache(unet: torch.nn.Module, interval: int = 1) -> Iterator[None]:
    """Within the block, calls to `unet` (eager or compiled) reuse the deep features of the last
    full pass for `interval`-1 calls in every `interval`; at 1 nothing is installed."""
    if interval == 1:
        yield
        return
    eager = getattr(unet, "_orig_mod", unet)
    cache = DeepCache(eager, interval)
    kept = _layer_modules(eager.up_blocks[-1], 0)[-1].register_forward_hook(cache.keep)
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    registry.register_hook(cache, HOOK)
    try:
        yield
    finally:
        registry.remove_hook(HOOK, recurse=False)
        kept.remove()
        cache.deep = None


def _layer_modules(block: torch.nn.Module, index: int) -> list[torch.nn.Module]:
    """A block's layer: its resnet, then its attention where the block has attention."""
    attentions = getattr(block, "attentions", None)
    return [block.resnets[index], *([attentions[index]] if attentions is not None else [])]


def _layer(
    block: torch.nn.Module,
    index: int,
    hidden: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor,
    indicator: torch.Tensor,
) -> torch.Tensor:
    resnet, *attention = _layer_modules(block, index)
    hidden = resnet(hidden, emb, image_only_indicator=indicator)
    for attn in attention:
        hidden = attn(hidden, encoder_hidden_states=context, image_only_indicator=indicator, return_dict=False)[0]
    return hidden


def outer_layers(
    unet: UNetSpatioTemporalConditionModel,
    deep: torch.Tensor,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    added_time_ids: torch.Tensor,
) -> torch.Tensor:
    """The UNet's output from its outermost layers and `deep`, the output of its last up block's first layer.

    Every operation is the one UNetSpatioTemporalConditionModel.forward (diffusers 0.42) runs for
    these layers, in its order, so given that step's own deep feature the result is the full
    UNet's; tests/test_deepcache.py holds it to that.
    """
    batch, frames = sample.shape[:2]
    timesteps = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype))
    added = unet.add_time_proj(added_time_ids.flatten()).reshape(batch, -1).to(emb.dtype)
    emb = (emb + unet.add_embedding(added)).repeat_interleave(frames, dim=0, output_size=batch * frames)
    context = encoder_hidden_states.repeat_interleave(frames, dim=0, output_size=batch * frames)
    hidden = unet.conv_in(sample.flatten(0, 1))
    indicator = torch.zeros(batch, frames, dtype=hidden.dtype, device=hidden.device)
    # The skips the last up block's later layers take, first to last: conv_in's output, then
    # the first down block's layers but its last, whose output went into the deep feature.
    skips = [hidden]
    first, last = unet.down_blocks[0], unet.up_blocks[-1]
    for index in range(len(last.resnets) - 2):
        skips.append(_layer(first, index, skips[-1], emb, context, indicator))
    hidden = deep
    for index in range(1, len(last.resnets)):
        hidden = torch.cat([hidden, skips.pop()], dim=1)
        hidden = _layer(last, index, hidden, emb, context, indicator)
    hidden = unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))
    return hidden.reshape(batch, frames, *hidden.shape[1:])
