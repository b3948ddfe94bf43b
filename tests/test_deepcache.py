"""cache_interval (svd/core/deepcache.py): the cached steps compute what the UNet would from the kept
features, only every n-th step runs the whole UNet, and nothing of the cache outlives its denoising."""

from __future__ import annotations

import gc
import threading
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel
from PIL import Image

from harness import PHOTO, decode_video
from svd.base.params import GenerationParams
from svd.base.progress import Progress
from svd.base.settings import Settings
from svd.core.deepcache import HOOK, _layer_modules, outer_layers
from svd.core.generate import OutOfMemory, Stopped, denoise, generate, seeded
from svd.core.loading import LoadedModel, load_pipeline

PARAMS = GenerationParams(width=128, height=64, num_frames=4, num_inference_steps=7, seed=5).resolve(25)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_pipeline(Settings(model_id="tiny", device="cpu"))


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.open(PHOTO).convert("RGB").resize((PARAMS.width, PARAMS.height))


def _xt_shaped() -> UNetSpatioTemporalConditionModel:
    """SVD-XT's blocks and layers (attention from the first block on, two layers per block), narrow."""
    torch.manual_seed(0)
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 32, 64, 64),
        num_attention_heads=(2, 2, 4, 4),
        cross_attention_dim=32,
        addition_time_embed_dim=32,
        projection_class_embeddings_input_dim=96,
        num_frames=4,
    )


def _counting(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, module.register_forward_pre_hook(lambda *_: calls.append(1))


@pytest.mark.parametrize("unet", ["tiny", "xt-shaped"])
@torch.no_grad()
def test_the_outer_layers_on_a_step_s_own_deep_feature_are_the_whole_unet(model, unet: str):
    """Bit for bit: the cached path runs the very operations of diffusers' forward, conditioning included."""
    net = model.pipe.unet if unet == "tiny" else _xt_shaped()
    frames, channels = 4, net.config.cross_attention_dim
    sample = torch.randn(2, frames, net.config.in_channels, 8, 16)
    context, time_ids = torch.randn(2, 1, channels), torch.randn(2, 3)
    kept: list[torch.Tensor] = []
    handle = _layer_modules(net.up_blocks[-1], 0)[-1].register_forward_hook(
        lambda _m, _i, out: kept.append(out[0] if isinstance(out, tuple) else out)
    )
    whole = net(sample, torch.tensor(0.7), context, time_ids, return_dict=False)[0]
    handle.remove()
    assert torch.equal(outer_layers(net, kept[0], sample, torch.tensor(0.7), context, time_ids), whole)


def test_interval_1_gives_the_very_frames_of_the_pipeline_without_the_cache(model, image):
    latents = denoise(model, image, PARAMS)
    plain = model.pipe(
        image,
        width=PARAMS.width,
        height=PARAMS.height,
        num_frames=PARAMS.num_frames,
        num_inference_steps=PARAMS.num_inference_steps,
        generator=seeded(PARAMS.seed),
        output_type="latent",
    ).frames
    assert torch.equal(latents, plain)
    assert not torch.equal(denoise(model, image, replace(PARAMS, cache_interval=2)), plain)


@pytest.mark.parametrize(("interval", "guidance", "whole_passes"), [(2, 3.0, 4), (3, 3.0, 3), (3, 1.0, 3), (5, 3.0, 2)])
def test_a_cached_run_passes_the_whole_unet_every_nth_step_with_guidance_progress_and_segments(
    model, image, tmp_path: Path, interval: int, guidance: float, whole_passes: int
):
    pipe = model.pipe
    (calls, counting_calls), (deep, counting_deep) = _counting(pipe.unet), _counting(pipe.unet.mid_block)
    batches: list[int] = []
    outputs = pipe.unet.register_forward_hook(lambda _m, _i, out: batches.append(out[0].shape[0]))
    reports: list[Progress] = []
    params = replace(PARAMS, cache_interval=interval, max_guidance_scale=guidance, segments=2)
    try:
        result = generate(model, image, params, tmp_path, report=reports.append)
    finally:
        for handle in (counting_calls, counting_deep, outputs):
            handle.remove()
    assert len(decode_video(result.path).frames) == 2 * 4 - 1
    assert len(calls) == 2 * 7, "every step calls the UNet"
    assert len(deep) == 2 * whole_passes, f"the whole UNet at steps 0, {interval}, ... of each segment"
    assert set(batches) == {2 if guidance > 1 else 1}, "the cached steps answer for both halves of guidance"
    steps = [(p.segment, p.step) for p in reports if p.stage == "denoise"]
    assert steps == [(segment, step) for segment in (1, 2) for step in range(1, 8)]
    assert result.params.cache_interval == interval


def test_one_step_is_a_whole_pass_whatever_the_interval(model, image):
    one = replace(PARAMS, num_inference_steps=1)
    assert torch.equal(denoise(model, image, replace(one, cache_interval=5)), denoise(model, image, one))


def _kept_feature(model: LoadedModel) -> tuple[list[weakref.ref], torch.utils.hooks.RemovableHandle]:
    """Weak references to every deep feature the cache could keep, so a test can see it released."""
    refs: list[weakref.ref] = []
    layer = _layer_modules(model.pipe.unet.up_blocks[-1], 0)[-1]
    return refs, layer.register_forward_hook(lambda _m, _i, out: refs.append(weakref.ref(out)))


def _assert_released(model: LoadedModel, refs: list[weakref.ref]) -> None:
    unet = model.pipe.unet
    gc.collect()
    assert refs and all(ref() is None for ref in refs), "a deep feature outlived its denoising"
    assert HOOK not in unet._diffusers_hook.hooks
    assert len(_layer_modules(unet.up_blocks[-1], 0)[-1]._forward_hooks) == 0


def test_the_cache_is_released_after_a_run(model, image, tmp_path: Path):
    refs, handle = _kept_feature(model)
    generate(model, image, replace(PARAMS, cache_interval=3), tmp_path)
    handle.remove()
    _assert_released(model, refs)


def test_a_stop_at_a_cached_step_stops_there_and_releases_the_cache(model, image, tmp_path: Path):
    stop = threading.Event()
    steps: list[int] = []

    def report(progress: Progress) -> None:
        if progress.stage == "denoise":
            steps.append(progress.step)
            if progress.step == 2:
                stop.set()

    refs, handle = _kept_feature(model)
    with pytest.raises(Stopped, match="while denoising"):
        generate(model, image, replace(PARAMS, cache_interval=3), tmp_path, report=report, stop=stop)
    handle.remove()
    assert steps == [1, 2]
    _assert_released(model, refs)


def test_out_of_memory_at_a_cached_step_is_reported_and_the_cache_released(model, image, tmp_path: Path):
    """Step 2 is a cached one at interval 3: the out-of-memory strikes in the outer layers."""
    calls: list[int] = []

    def strike(*_: object) -> None:
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected at conv_out)")

    refs, handle = _kept_feature(model)
    oom = model.pipe.unet.conv_out.register_forward_pre_hook(strike)
    try:
        with pytest.raises(OutOfMemory, match="while denoising"):
            generate(model, image, replace(PARAMS, cache_interval=3), tmp_path)
    finally:
        oom.remove()
        handle.remove()
    _assert_released(model, refs)
    after = generate(model, image, replace(PARAMS, cache_interval=3), tmp_path)
    assert len(decode_video(after.path).frames) == 4
