"""Decoupled cross-attention of ID-Animator: text_out + λ·face_out with one shared query.

Official §6 (`LoRAFaceAttnProcessor`, inference branch): the attn2 query attends to the 77 text
tokens and, separately, to 16 face tokens projected by `to_k_face`/`to_v_face`; the two outputs
are summed with weight λ before `to_out`. The attn2 LoRAs are merged into the weights elsewhere
(`lora.py`), so everything here works on already-projected q/k/v.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import IDAnimatorError

AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]
"""(q (B,Lq,H*D), k (B,Lk,H*D), v (B,Lk,H*D), heads) -> (B,Lq,H*D); ComfyUI's
`optimized_attention` has this call shape."""

COND, UNCOND = 0, 1  # values of ComfyUI's `cond_or_uncond` entries


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Multi-head softmax(q kᵀ / sqrt(D)) v with D = width / heads, no mask."""
    batch, _, width = q.shape
    head_dim = width // heads
    # (B, L, H*D) -> (B, H, L, D)
    q, k, v = (x.reshape(batch, -1, heads, head_dim).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    # (B, H, Lq, D) -> (B, Lq, H*D)
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim)


def project_face_tokens(face_tokens: Tensor, to_k_face: Tensor,
                        to_v_face: Tensor) -> tuple[Tensor, Tensor]:
    """Face keys and values (K,16,C) = tokens (K,16,768) @ W_kface/W_vface (C,768) transposed.

    Computed once per set of tokens and reused for every step and frame; the projection is
    linear, so per-frame identity blends may be taken after it (see `mix_identities`).
    """
    return F.linear(face_tokens, to_k_face), F.linear(face_tokens, to_v_face)


def mix_identities(per_identity: Tensor, weights: Tensor) -> Tensor:
    """Per-frame weighted sum over identities of their face tokens or face K/V (the projection is
    linear, so both orders agree): (K,16,C) with weights (F,K) -> (F,16,C)."""
    if weights.ndim != 2 or weights.shape[1] != per_identity.shape[0]:
        raise IDAnimatorError(
            f"Identity weights of shape {tuple(weights.shape)} do not match "
            f"{per_identity.shape[0]} identities; expected (frames, {per_identity.shape[0]}).")
    return torch.einsum("fk,ktc->ftc", weights.to(per_identity), per_identity)


def batch_face_kv(cond: Tensor, uncond: Tensor, cond_or_uncond: Sequence[int],
                  frames: int) -> Tensor:
    """Face K or V laid out like ComfyUI's batch: one chunk of `frames` rows per cond_or_uncond.

    ComfyUI concatenates the cond and uncond passes along the batch axis in the order given by
    `cond_or_uncond` (0 = cond, 1 = uncond), each chunk holding the video's frames; the order is
    not fixed, so it is read, never assumed. cond (F,16,C) or (1,16,C) (broadcast over frames);
    uncond (1,16,C) or (16,C). Returns (len(cond_or_uncond)*frames, 16, C).
    """
    if cond.ndim == 2:
        cond = cond[None]
    if uncond.ndim == 2:
        uncond = uncond[None]
    if cond.shape[0] not in (1, frames):
        raise IDAnimatorError(
            f"Got face tokens for {cond.shape[0]} frames but the batch chunk has {frames} "
            f"frames; per-frame tokens must match the frames being sampled.")
    if uncond.shape[0] != 1:
        raise IDAnimatorError(
            f"Unconditional face tokens must be one set (16 tokens), got {tuple(uncond.shape)}.")
    chunks = {COND: cond.expand(frames, -1, -1), UNCOND: uncond.expand(frames, -1, -1)}
    try:
        return torch.cat([chunks[c] for c in cond_or_uncond], dim=0)
    except KeyError as error:
        raise IDAnimatorError(
            f"cond_or_uncond entries must be 0 (cond) or 1 (uncond), got {list(cond_or_uncond)}."
        ) from error


def decoupled_attention(q: Tensor, text_k: Tensor, text_v: Tensor, face_k: Tensor,
                        face_v: Tensor, scale: float, heads: int,
                        attention: AttentionFn = sdpa_attention,
                        face_mask: Tensor | None = None,
                        text_out: Tensor | None = None,
                        inplace: bool | None = None) -> Tensor:
    """text_out + λ·face_out, both attended with the same query q (official §6 steps 4-6).

    `text_out` may be supplied (e.g. another pack's attn2 patch already computed the text
    branch). `face_mask` broadcastable to (B, Lq, 1) weights the face branch only.

    In place (the default when no gradient is recorded, i.e. at inference): the sum is written
    into `text_out`, which is then consumed, saving two full-size temporaries per layer.
    Autograd cannot take that path (SDPA's backward needs its own output unmodified), so when a
    gradient flows through any input (training) the same sum is formed out of place;
    `inplace` forces either choice.
    """
    if inplace is None:
        inplace = not (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (q, text_k, text_v, face_k, face_v, face_mask, text_out)))
    if text_out is None:
        text_out = attention(q, text_k, text_v, heads)
    face_out = attention(q, face_k.to(q), face_v.to(q), heads)
    if not inplace:
        if face_mask is not None:
            face_out = face_out * face_mask.to(face_out)
        return torch.add(text_out, face_out, alpha=scale)
    if face_mask is not None:
        face_out.mul_(face_mask.to(face_out))
    return text_out.add_(face_out, alpha=scale)
