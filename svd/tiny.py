"""A tiny, randomly initialised SVD pipeline for tests, CI and smoke runs.

Every component has the real class and wiring of Stable Video Diffusion XT, only
narrower, so shapes, code paths and files are real while the video is noise.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKLTemporalDecoder,
    EulerDiscreteScheduler,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_SEED = 0
TINY_NUM_FRAMES = 25
_EMBED_DIM = 32
_TIME_EMBED_DIM = 32


def build_tiny_pipeline() -> StableVideoDiffusionPipeline:
    """Build the tiny pipeline on CPU in float32, identical on every call."""
    torch.manual_seed(TINY_SEED)
    # Attention only in the lowest-resolution block: attention over a full-size
    # latent grid is what makes a randomly initialised SVD crawl on CPU.
    unet = UNetSpatioTemporalConditionModel(
        sample_size=96,
        in_channels=8,
        out_channels=4,
        down_block_types=("DownBlockSpatioTemporal",) * 2 + ("CrossAttnDownBlockSpatioTemporal",),
        up_block_types=("CrossAttnUpBlockSpatioTemporal",) + ("UpBlockSpatioTemporal",) * 2,
        block_out_channels=(32, 32, 64),
        addition_time_embed_dim=_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=3 * _TIME_EMBED_DIM,
        layers_per_block=1,
        cross_attention_dim=_EMBED_DIM,
        num_attention_heads=(2, 2, 4),
        num_frames=TINY_NUM_FRAMES,
    )
    # Four levels give the real VAE scale factor of 8; 32 channels is the
    # narrowest width its 32-group normalisation allows.
    vae = AutoencoderKLTemporalDecoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=4,
    )
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=_EMBED_DIM,
            intermediate_size=37,
            projection_dim=_EMBED_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=32,
        )
    )
    # SVD-XT's own scheduler configuration.
    scheduler = EulerDiscreteScheduler(
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
    feature_extractor = CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224})
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
