"""attn2 LoRA: pairs keyed by ComfyUI weight keys, shaped like the weights they patch. ComfyUI merges
them; integration/test_lora_merge.py checks the merged weights it samples with."""
from __future__ import annotations

import pytest
import torch

from id_animator.adapter.errors import CheckpointError
from id_animator.adapter.layer_map import LAYERS, TEXT_CONTEXT_DIM
from id_animator.adapter.lora import LoRAPair, attn2_lora_pairs

RANK = 4  # the real adapter uses 128; the maths does not depend on it


def layer_tensors(channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {"to_k_face.weight": torch.randn(channels, TEXT_CONTEXT_DIM, generator=generator),
               "to_v_face.weight": torch.randn(channels, TEXT_CONTEXT_DIM, generator=generator)}
    for target, fan_in in (("to_q", channels), ("to_k", TEXT_CONTEXT_DIM),
                           ("to_v", TEXT_CONTEXT_DIM), ("to_out", channels)):
        tensors[f"{target}_lora.down.weight"] = torch.randn(RANK, fan_in, generator=generator)
        tensors[f"{target}_lora.up.weight"] = torch.randn(channels, RANK, generator=generator)
    return tensors


def test_pairs_cover_the_64_attn2_weights() -> None:
    generator = torch.Generator().manual_seed(0)
    weights = {layer.official_index: layer_tensors(layer.channels, generator) for layer in LAYERS}
    pairs = attn2_lora_pairs(weights)
    assert len(pairs) == 64
    for layer in LAYERS:
        tensors = weights[layer.official_index]
        for target, key in layer.weight_keys.items():
            pair = pairs[key]
            assert pair.up is tensors[f"{target}_lora.up.weight"]
            assert pair.down is tensors[f"{target}_lora.down.weight"]
        in_features = {"to_q": layer.channels, "to_k": TEXT_CONTEXT_DIM,
                       "to_v": TEXT_CONTEXT_DIM, "to_out": layer.channels}
        for target, key in layer.weight_keys.items():
            assert (pairs[key].up @ pairs[key].down).shape == (layer.channels, in_features[target])


def test_missing_lora_tensor_is_named() -> None:
    tensors = layer_tensors(320, torch.Generator().manual_seed(1))
    del tensors["to_v_lora.up.weight"]
    with pytest.raises(CheckpointError, match=r"1\.to_v_lora\.up\.weight"):
        attn2_lora_pairs({1: tensors})


def test_wrong_channels_are_rejected() -> None:
    tensors = layer_tensors(640, torch.Generator().manual_seed(2))
    with pytest.raises(CheckpointError, match="320"):
        attn2_lora_pairs({1: tensors})  # index 1 is a 320-channel block


def test_pair_ranks_must_chain() -> None:
    with pytest.raises(CheckpointError, match="rank"):
        LoRAPair(up=torch.zeros(8, 4), down=torch.zeros(3, 8))


def test_lora_that_does_not_fit_the_weight_is_rejected() -> None:
    tensors = layer_tensors(320, torch.Generator().manual_seed(3))
    tensors["to_k_lora.down.weight"] = torch.zeros(RANK, 320)  # to_k reads the 768-wide text context
    with pytest.raises(CheckpointError, match="768 -> 320"):
        attn2_lora_pairs({1: tensors})
