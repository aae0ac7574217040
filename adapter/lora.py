"""The adapter's rank-128 LoRAs on every attn2 to_q/to_k/to_v/to_out.0, as weight patches.

Official §3.3/§6: delta(x) = up(down(x)) with no alpha/rank rescaling and lora_scale 1.0. The
official code adds the delta at every step; merging it into the weights once is equivalent
(W' = W + up·down) and costs nothing per step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .errors import CheckpointError
from .layer_map import LORA_TARGETS, layer_by_index


@dataclass(frozen=True, eq=False)
class LoRAPair:
    """One low-rank update: up (out, r) @ down (r, in) has the shape of the patched weight."""

    up: Tensor
    down: Tensor

    def __post_init__(self) -> None:
        if self.up.ndim != 2 or self.down.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise CheckpointError(
                f"LoRA up {tuple(self.up.shape)} and down {tuple(self.down.shape)} do not "
                f"chain: expected up (out, rank) and down (rank, in) with the same rank.")


def attn2_lora_pairs(layer_weights: Mapping[int, Mapping[str, Tensor]]) -> dict[str, LoRAPair]:
    """ComfyUI weight key -> LoRAPair for the 4 LoRAs of each official adapter index given.

    `layer_weights[i]` holds index i's tensors named as in the checkpoint without the index
    prefix ("to_q_lora.down.weight", "to_q_lora.up.weight", ...).
    """
    pairs: dict[str, LoRAPair] = {}
    for index, tensors in layer_weights.items():
        layer = layer_by_index(index)
        for target in LORA_TARGETS:
            names = (f"{target}_lora.up.weight", f"{target}_lora.down.weight")
            missing = [name for name in names if name not in tensors]
            if missing:
                raise CheckpointError(
                    f"Adapter layer {index} lacks {', '.join(f'{index}.{m}' for m in missing)}; "
                    f"the ID-Animator checkpoint is incomplete or not an ID-Animator file.")
            pair = LoRAPair(up=tensors[names[0]], down=tensors[names[1]])
            if pair.up.shape[0] != layer.channels:
                raise CheckpointError(
                    f"Adapter layer {index} {target} LoRA outputs {pair.up.shape[0]} channels, "
                    f"but SD1.5 block {layer.ldm_block} has {layer.channels}.")
            pairs[layer.weight_keys[target]] = pair
    return pairs


def merge_lora(weight: Tensor, pair: LoRAPair, strength: float = 1.0) -> Tensor:
    """W + strength·up@down, computed in fp32 and returned in W's dtype (official: no alpha)."""
    delta = pair.up.to(weight.device, torch.float32) @ pair.down.to(weight.device, torch.float32)
    if delta.shape != weight.shape:
        raise CheckpointError(
            f"LoRA update of shape {tuple(delta.shape)} does not fit weight "
            f"{tuple(weight.shape)}; the adapter was made for another model (SD1.5 expected).")
    return (weight.to(torch.float32) + strength * delta).to(weight.dtype)
