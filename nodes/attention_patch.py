"""The attn2 replace patch ComfyUI calls in each SD1.5 cross-attention layer.

ComfyUI has already applied the (LoRA-merged) to_q/to_k/to_v and applies to_out after us; we
return text attention + weight * face attention (official §6, maths in adapter.face_attention).
Batch layout (comfy/samplers.py): the batch is the concatenation of `cond_or_uncond` chunks,
each holding the frames of the current (context) window.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from comfy.ldm.modules.attention import attention_pytorch, optimized_attention

from ..adapter.face_attention import batch_face_kv, decoupled_attention, mix_identities
from ..adapter.identity import FaceEmbeds
from ..adapter.layer_map import CrossAttentionLayer


def frame_window(extra_options: dict[str, Any], frames: int) -> tuple[list[int], int]:
    """Global index of each frame in this batch chunk, and the video's frame count.

    AnimateDiff-Evolved context windows give `ad_params.sub_idxs`, core context windows give
    `context_window.index_list`; without windows the chunk is the whole video.
    """
    ad_params = extra_options.get("ad_params") or {}
    window = extra_options.get("context_window")
    if ad_params.get("sub_idxs") is not None:
        indices, total = list(ad_params["sub_idxs"]), int(ad_params.get("full_length") or frames)
    elif window is not None and getattr(window, "index_list", None) is not None:
        indices, total = list(window.index_list), int(getattr(window, "total_frames", None) or frames)
    else:
        return list(range(frames)), frames
    # Pad (repeat the last) or cut so every frame in the chunk has an index.
    indices = (indices + indices[-1:] * frames)[:frames] if indices else list(range(frames))
    return indices, max(total, max(indices) + 1)


def token_grid(original_shape: Sequence[int], tokens: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with `tokens` query tokens, from the latent's shape."""
    h, w = int(original_shape[-2]), int(original_shape[-1])
    for scale in (1, 2, 4, 8, 16):
        gh, gw = math.ceil(h / scale), math.ceil(w / scale)
        if gh * gw == tokens:
            return gh, gw
    side = int(round(math.sqrt(tokens)))
    return side, max(tokens // max(side, 1), 1)


def mask_tokens(mask: torch.Tensor, grid: tuple[int, int], frame_indices: Sequence[int]) -> torch.Tensor:
    """MASK (M,H,W) -> per-frame token weights (F, h*w, 1); one mask applies to every frame."""
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="bilinear", align_corners=False)
    rows = torch.tensor([min(i, mask.shape[0] - 1) for i in frame_indices])
    return resized[rows].flatten(1)[..., None]  # (F, h*w, 1)


@dataclass(frozen=True)
class FaceAttentionPatch:
    layer: CrossAttentionLayer
    face_keys: torch.Tensor  # (K,16,C): one set per identity in the embeds
    face_values: torch.Tensor
    uncond_keys: torch.Tensor  # (1,16,C)
    uncond_values: torch.Tensor
    embeds: FaceEmbeds  # only its blend schedule is used here
    weight: float
    sigma_start: float
    sigma_end: float
    mask: torch.Tensor | None = None  # (M,H,W) in 0..1
    previous: Callable | None = None  # another pack's attn2 patch: its output is our text branch

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]

        precision = extra_options.get("attn_precision")

        def face_attention(q_, k_, v_, heads_):
            # 16 keys: the score tensor is small whatever the resolution, so PyTorch's fused SDPA
            # is always safe and fastest; ComfyUI's chunked CPU default (sub-quadratic) costs
            # ~4x more here for nothing.
            return attention_pytorch(q_, k_, v_, heads_, attn_precision=precision)

        text_out = (self.previous(q, k, v, extra_options) if self.previous is not None
                    else optimized_attention(q, k, v, heads, attn_precision=precision))
        sigma = float(extra_options["sigmas"].flatten()[0])
        if self.weight == 0.0 or not (self.sigma_end <= sigma <= self.sigma_start):
            return text_out
        chunks = extra_options["cond_or_uncond"]
        frames = q.shape[0] // len(chunks)
        indices, total = frame_window(extra_options, frames)
        keys, values = self.face_kv(indices, total, chunks, frames, q)
        face_mask = None
        if self.mask is not None:
            grid = token_grid(extra_options["original_shape"], q.shape[1])
            face_mask = mask_tokens(self.mask, grid, indices).repeat(len(chunks), 1, 1).to(q)
        return decoupled_attention(q, k, v, keys, values, self.weight, heads, attention=face_attention,
                                   face_mask=face_mask, text_out=text_out)

    def face_kv(self, indices: list[int], total: int, chunks: Sequence[int], frames: int,
                like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Face keys/values for each batch row, following `chunks` (0 = cond, 1 = uncond)."""
        if self.embeds.is_static:
            weights = self.embeds.frame_weights([0], 1)  # (1,K): the same identity on every frame
        else:
            weights = self.embeds.frame_weights(indices, total)  # (F,K)
        weights = weights.to(self.face_keys)
        cond_k, cond_v = mix_identities(self.face_keys, weights), mix_identities(self.face_values, weights)
        keys = batch_face_kv(cond_k, self.uncond_keys, chunks, frames)
        values = batch_face_kv(cond_v, self.uncond_values, chunks, frames)
        return keys.to(like), values.to(like)

    def to(self, device: torch.device) -> "FaceAttentionPatch":
        """ComfyUI moves patches with the model; return a moved copy, never change this one."""
        previous = self.previous.to(device) if hasattr(self.previous, "to") else self.previous
        return dataclasses.replace(
            self, face_keys=self.face_keys.to(device), face_values=self.face_values.to(device),
            uncond_keys=self.uncond_keys.to(device), uncond_values=self.uncond_values.to(device),
            mask=None if self.mask is None else self.mask.to(device), previous=previous)
