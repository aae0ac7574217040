"""The adapter's rank-128 LoRAs on every attn2 to_q/to_k/to_v/to_out.0, as weight patches.

Official §3.3/§6: delta(x) = up(down(x)) with no alpha/rank rescaling and lora_scale 1.0. The
official code adds the delta at every step; merging it into the weights once is equivalent
(W' = W + up·down) and costs nothing per step. ComfyUI does the merge (`LoRAAdapter` weight
patches, in nodes/apply_face_adapter.py): it keeps only the rank-128 factors, computes in fp32,
rounds into the model's dtype, patches on the fly in low-VRAM mode and restores W on unpatch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from torch import Tensor

from .errors import CheckpointError
from .layer_map import LORA_TARGETS, TEXT_CONTEXT_DIM, layer_by_index


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
            fan_in = TEXT_CONTEXT_DIM if target in ("to_k", "to_v") else layer.channels
            if pair.up.shape[0] != layer.channels or pair.down.shape[1] != fan_in:
                raise CheckpointError(
                    f"Adapter layer {index} {target} LoRA maps {pair.down.shape[1]} -> {pair.up.shape[0]} "
                    f"channels, but SD1.5 block {layer.ldm_block} needs {fan_in} -> {layer.channels}; "
                    f"the adapter was made for another model.")
            pairs[layer.weight_keys[target]] = pair
    return pairs
