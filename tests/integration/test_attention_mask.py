"""The attn_mask reaches the right tokens. On a non-square latent (64x96 px: 8x12 latent) with a
different, asymmetric mask per frame, every layer's output must equal text + λ·m·face, where m is
the mask's value at the centre of each token's cell, computed here from the UNet's layout (token
grid per block, row-major tokens) and not from the pack's resizing code; mask edges sit between
cell centres at every layer, so swapped height/width, a transposed mask or a wrong frame all fail."""
from __future__ import annotations

import math

import pytest
import torch

from support.attn2_reference import INDEX_OF_KEY, adapter_tensors, face_branch, recording, rel_err, sample, text_branch
from support.graphs import ADAPTER

REL_TOL = 2e-5
HEIGHT, WIDTH = 64, 96
LATENT_H, LATENT_W = HEIGHT // 8, WIDTH // 8
DOWNSCALE = {"input": {1: 1, 2: 1, 4: 2, 5: 2, 7: 4, 8: 4}, "middle": {0: 8},
             "output": {3: 4, 4: 4, 5: 4, 6: 2, 7: 2, 8: 2, 9: 1, 10: 1, 11: 1}}  # SD1.5 attn2 blocks


def frame_masks() -> torch.Tensor:
    """Frame 0: top-left block; frame 1: bottom-right block. Edges at pixels = 2 (mod 4), never at a
    token centre (all centres of the 8x12 .. 1x2 grids fall on multiples of 4)."""
    masks = torch.zeros(2, HEIGHT, WIDTH)
    masks[0, :22, :58] = 1.0
    masks[1, 42:, 30:] = 1.0
    return masks


def token_weights(masks: torch.Tensor, key: tuple, tokens: int) -> torch.Tensor:
    """(frames, tokens): each frame's mask at the centre of every token's cell, tokens row-major."""
    scale = DOWNSCALE[key[0]][key[1]]
    rows, cols = math.ceil(LATENT_H / scale), math.ceil(LATENT_W / scale)  # stride-2 convs round up
    assert rows * cols == tokens, (key, rows, cols, tokens)
    ys = [int((r + 0.5) * HEIGHT / rows) for r in range(rows)]
    xs = [int((c + 0.5) * WIDTH / cols) for c in range(cols)]
    return masks[:, ys][:, :, xs].flatten(1)


@pytest.fixture(scope="module")
def bed(identity_bed, model_files):
    return identity_bed.unet, identity_bed.ida, identity_bed.embeds, adapter_tensors(model_files["id_animator"][ADAPTER])


def test_mask_weights_each_token_of_each_frame(comfy, bed):
    unet, ida, embeds, layers = bed
    masks = frame_masks()
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    calls: list[dict] = []
    model = recording(node.execute(unet, ida, embeds, 1.0, 0.0, 1.0, 0.0, masks).args[0], calls)
    sample(comfy, model, frames=2, steps=1, height=HEIGHT, width=WIDTH)
    assert len(calls) == 16
    seen = set()
    for call in calls:
        weights = token_weights(masks, call["key"], call["q"].shape[1])  # (frames, tokens)
        rows = weights.repeat(len(call["cond_or_uncond"]), 1)[..., None]  # every chunk holds both frames
        text = text_branch(call)
        face = face_branch(call, layers[INDEX_OF_KEY[call["key"][:2]]], embeds.face_tokens[:1], embeds.uncond_tokens)
        assert rel_err(call["out"], text + rows * face) <= REL_TOL, call["key"]
        if 0 < weights.mean() < 1:
            seen.add(tuple(weights.shape))
            assert rel_err(text + face, text + rows * face) > 100 * REL_TOL  # the mask matters here
    assert len(seen) >= 3  # the 8x12, 4x6 and 2x3 grids all had tokens in and out of the mask
