"""The tiny models of training.md §5, for training tests and benchmarks on CPU.

A UNetMotionModel with SD1.5's block layout at widths 32/64/64/64 (the same 16 attn2 module names),
text context 32, and CLIP text and image encoders of that context (image-feature width 48). The
adapter on them: LoRA rank 8, a Resampler of width 32, depth 1, 4 queries. The builders draw from
torch's global generator and do not seed it: callers seed, so each keeps its random weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

BLOCKS = (32, 64, 64, 64)  # UNet block widths (SD1.5: 320, 640, 1280, 1280)
CONTEXT = 32  # text context width (SD1.5: 768)
FEATURES = 48  # image encoder width, the Resampler's input (ViT-H: 1280)
QUERIES = 4  # face tokens
RANK = 8  # LoRA rank
RESAMPLER: dict[str, int] = {"dim": 32, "depth": 1, "dim_head": 16, "heads": 2, "num_queries": QUERIES}
# The trainer's --adapter-config for these models (the Resampler's input and output widths it reads
# from the encoders).
ADAPTER: dict[str, Any] = {"rank": RANK, "resampler": {**RESAMPLER, "ff_mult": 2}}


def tiny_unet() -> UNetMotionModel:
    """The UNetMotionModel of training.md §5, random."""
    from diffusers import UNetMotionModel

    return UNetMotionModel(block_out_channels=BLOCKS, layers_per_block=2, cross_attention_dim=CONTEXT,
                           num_attention_heads=2, motion_num_attention_heads=2, norm_num_groups=32)


def tiny_unet2d(sample_size: int = 8) -> UNet2DConditionModel:
    """The image UNet of the same layout (SD1.5's block types), as a diffusers checkpoint holds it."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=BLOCKS, layers_per_block=2, cross_attention_dim=CONTEXT, attention_head_dim=2,
        norm_num_groups=32, sample_size=sample_size,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def tiny_motion_adapter() -> MotionAdapter:
    """A MotionAdapter for `tiny_unet2d` (with a motion mid block, as AnimateDiff v2)."""
    from diffusers import MotionAdapter

    return MotionAdapter(block_out_channels=BLOCKS, motion_layers_per_block=2, motion_num_attention_heads=2,
                         motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True)


def tiny_text_encoder() -> CLIPTextModel:
    """A one-layer CLIP text encoder of width CONTEXT with SD1.5's vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=CONTEXT, intermediate_size=37,
                                        num_hidden_layers=1, num_attention_heads=2, projection_dim=CONTEXT,
                                        max_position_embeddings=77))


def tiny_image_encoder() -> CLIPVisionModelWithProjection:
    """A two-layer CLIP image encoder of width FEATURES on 224x224 images (257 tokens)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=FEATURES, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=14, projection_dim=CONTEXT))


def tiny_vae(sample_size: int = 64) -> AutoencoderKL:
    """An SD-layout AutoencoderKL (4 blocks: 8x downsampling, 4 latent channels) at width 32, for
    decoding validation videos of the tiny UNet."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                         block_out_channels=(32,) * 4, norm_num_groups=32, sample_size=sample_size,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=0.18215)
