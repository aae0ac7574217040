"""Layer map: the 16 attn2 layers, their official order, names in each world, and lookups."""
from __future__ import annotations

import re

import pytest
import torch

from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.layer_map import (
    FACE_TOKENS, LAYERS, TEXT_CONTEXT_DIM, CrossAttentionLayer, layer_by_index, layer_by_patch_key)


def test_sixteen_layers_with_odd_official_indices_in_order() -> None:
    assert len(LAYERS) == 16
    assert [layer.official_index for layer in LAYERS] == list(range(1, 32, 2))
    assert LAYERS[-1].ldm_block == "middle_block.1"
    assert LAYERS[-1].patch_key == ("middle", 0)
    assert TEXT_CONTEXT_DIM == 768 and FACE_TOKENS == 16


def test_channels_follow_the_sd15_blocks() -> None:
    assert [layer.channels for layer in LAYERS] == (
        [320, 320, 640, 640, 1280, 1280]  # down blocks 0-2
        + [1280, 1280, 1280, 640, 640, 640, 320, 320, 320]  # up blocks 1-3
        + [1280])  # mid block


def test_names_are_unique() -> None:
    for field in ("official_index", "diffusers_module", "ldm_block", "patch_key"):
        values = [getattr(layer, field) for layer in LAYERS]
        assert len(set(values)) == 16, field
    weight_keys = [key for layer in LAYERS for key in layer.weight_keys.values()]
    assert len(set(weight_keys)) == 64


def ldm_block_of(diffusers_module: str) -> str:
    """SD1.5 diffusers -> LDM block naming (3 slots per input level, 3 attentions per up level)."""
    if diffusers_module.startswith("mid_block."):
        return "middle_block.1"
    kind, level, attention = re.match(r"(down|up)_blocks\.(\d)\.attentions\.(\d)", diffusers_module).groups()
    if kind == "down":
        return f"input_blocks.{3 * int(level) + int(attention) + 1}.1"
    return f"output_blocks.{3 * int(level) + int(attention)}.1"


@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: str(layer.official_index))
def test_ldm_block_patch_key_and_weight_keys_agree(layer: CrossAttentionLayer) -> None:
    assert layer.ldm_block == ldm_block_of(layer.diffusers_module)
    kind = {"input_blocks": "input", "output_blocks": "output", "middle_block": "middle"}
    block, number = layer.ldm_block.split(".")[:2]
    if kind[block] != "middle":
        assert layer.patch_key == (kind[block], int(number))
    attn2 = f"diffusion_model.{layer.ldm_block}.transformer_blocks.0.attn2"
    assert layer.weight_keys == {"to_q": f"{attn2}.to_q.weight", "to_k": f"{attn2}.to_k.weight",
                                 "to_v": f"{attn2}.to_v.weight", "to_out": f"{attn2}.to_out.0.weight"}


def test_order_and_channels_match_diffusers_unet_processor_list() -> None:
    """The official adapter list is unet.attn_processors in registration order (odd = attn2)."""
    unet_module = pytest.importorskip("diffusers.models.unets.unet_2d_condition")
    with torch.device("meta"):
        unet = unet_module.UNet2DConditionModel(
            cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    processors = list(unet.attn_processors)
    assert len(processors) == 32
    for layer in LAYERS:
        assert processors[layer.official_index] == f"{layer.diffusers_module}.processor"
        attn2 = unet.get_submodule(layer.diffusers_module)
        assert attn2.to_q.out_features == layer.channels
        assert attn2.to_k.in_features == TEXT_CONTEXT_DIM


def test_lookups() -> None:
    for layer in LAYERS:
        assert layer_by_index(layer.official_index) is layer
        assert layer_by_patch_key(layer.patch_key) is layer
        assert layer_by_patch_key(list(layer.patch_key)) is layer
    assert layer_by_patch_key(("middle", 1)) is layer_by_index(31)
    for bad_index in (0, 2, 33):
        with pytest.raises(IDAnimatorError, match="odd"):
            layer_by_index(bad_index)
    with pytest.raises(IDAnimatorError, match="SD1.5"):
        layer_by_patch_key(("input", 3))  # a downsampler, not an attention block


def test_layers_are_frozen() -> None:
    with pytest.raises(AttributeError):
        LAYERS[0].channels = 640  # type: ignore[misc]
