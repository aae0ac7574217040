"""The 16 SD1.5 cross-attention (attn2) layers that ID-Animator patches, in one table.

Each row ties the official adapter index (odd numbers 1..31 of `animator.ckpt`'s adapter list,
official §3.4) to the diffusers module, the LDM/ComfyUI UNet block, the ComfyUI attn2 patch
key and the block's channel count. Order is the official one: down, up, then mid last.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import IDAnimatorError

TEXT_CONTEXT_DIM = 768  # SD1.5 cross_attention_dim: width of text and face tokens
FACE_TOKENS = 16  # Resampler num_queries: face tokens appended after the 77 text tokens

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One attn2 layer of the SD1.5 UNet as the official adapter and ComfyUI name it."""

    official_index: int
    diffusers_module: str
    ldm_block: str
    patch_key: tuple[str, int]
    channels: int

    @property
    def weight_keys(self) -> dict[str, str]:
        """ComfyUI model weight keys of the four LoRA-patched attn2 projections."""
        attn2 = f"diffusion_model.{self.ldm_block}.transformer_blocks.0.attn2"
        return {
            "to_q": f"{attn2}.to_q.weight",
            "to_k": f"{attn2}.to_k.weight",
            "to_v": f"{attn2}.to_v.weight",
            "to_out": f"{attn2}.to_out.0.weight",
        }


def _layer(index: int, diffusers_block: str, ldm_block: str, patch_key: tuple[str, int],
           channels: int) -> CrossAttentionLayer:
    return CrossAttentionLayer(
        official_index=index,
        diffusers_module=f"{diffusers_block}.transformer_blocks.0.attn2",
        ldm_block=ldm_block,
        patch_key=patch_key,
        channels=channels,
    )


LAYERS: tuple[CrossAttentionLayer, ...] = (
    _layer(1, "down_blocks.0.attentions.0", "input_blocks.1.1", ("input", 1), 320),
    _layer(3, "down_blocks.0.attentions.1", "input_blocks.2.1", ("input", 2), 320),
    _layer(5, "down_blocks.1.attentions.0", "input_blocks.4.1", ("input", 4), 640),
    _layer(7, "down_blocks.1.attentions.1", "input_blocks.5.1", ("input", 5), 640),
    _layer(9, "down_blocks.2.attentions.0", "input_blocks.7.1", ("input", 7), 1280),
    _layer(11, "down_blocks.2.attentions.1", "input_blocks.8.1", ("input", 8), 1280),
    _layer(13, "up_blocks.1.attentions.0", "output_blocks.3.1", ("output", 3), 1280),
    _layer(15, "up_blocks.1.attentions.1", "output_blocks.4.1", ("output", 4), 1280),
    _layer(17, "up_blocks.1.attentions.2", "output_blocks.5.1", ("output", 5), 1280),
    _layer(19, "up_blocks.2.attentions.0", "output_blocks.6.1", ("output", 6), 640),
    _layer(21, "up_blocks.2.attentions.1", "output_blocks.7.1", ("output", 7), 640),
    _layer(23, "up_blocks.2.attentions.2", "output_blocks.8.1", ("output", 8), 640),
    _layer(25, "up_blocks.3.attentions.0", "output_blocks.9.1", ("output", 9), 320),
    _layer(27, "up_blocks.3.attentions.1", "output_blocks.10.1", ("output", 10), 320),
    _layer(29, "up_blocks.3.attentions.2", "output_blocks.11.1", ("output", 11), 320),
    _layer(31, "mid_block.attentions.0", "middle_block.1", ("middle", 0), 1280),
)

_BY_INDEX = {layer.official_index: layer for layer in LAYERS}
_BY_PATCH_KEY = {layer.patch_key: layer for layer in LAYERS}
# ComfyUI reports the middle block as ("middle", 0); some packs register ("middle", 1).
_BY_PATCH_KEY[("middle", 1)] = _BY_INDEX[31]


def layer_by_index(index: int) -> CrossAttentionLayer:
    """The layer for an official adapter index (odd, 1..31)."""
    try:
        return _BY_INDEX[index]
    except KeyError:
        raise IDAnimatorError(
            f"No ID-Animator cross-attention layer has official index {index}; valid indices "
            f"are the odd numbers 1..31 (even ones are self-attention, which has no weights)."
        ) from None


def layer_by_patch_key(key: tuple[str, int]) -> CrossAttentionLayer:
    """The layer for a ComfyUI attn2 patch key such as ("input", 1) or ("middle", 0)."""
    try:
        return _BY_PATCH_KEY[(key[0], int(key[1]))]
    except (KeyError, IndexError, TypeError, ValueError):
        raise IDAnimatorError(
            f"{key!r} is not an SD1.5 cross-attention block; expected one of "
            f"{sorted(_BY_PATCH_KEY)}. Is the MODEL an SD1.5 UNet?"
        ) from None
