"""The official formulation of one ID-Animator attn2 layer, written out as a benchmark reference.

Official §6 (`LoRAFaceAttnProcessor`, inference branch), the way the released code spends its
time: the four rank-128 LoRAs are computed unmerged at every forward (q, k, v and out), the 16
face tokens arrive appended to every frame's context and are projected to keys/values again on
every call, and attention is the non-fused kind (scores materialised with baddbmm, softmax, bmm).
Pure PyTorch, no ComfyUI: tests/unit/test_bench_reference.py checks it against our merged
formulation, so the timing comparison in bench/attention.py compares equal outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

FACE_TOKENS = 16  # the last 16 context tokens are face tokens (official §6 step 1)


@dataclass(frozen=True)
class OfficialAttn2:
    """One attn2 layer's weights as the official processor holds them: base weights unmerged,
    LoRA (up (out,r), down (r,in)) kept apart, face projections (C,768)."""

    to_q: Tensor
    to_k: Tensor
    to_v: Tensor
    to_out: Tensor
    to_out_bias: Tensor
    lora: Mapping[str, tuple[Tensor, Tensor]]  # "to_q"/"to_k"/"to_v"/"to_out" -> (up, down)
    to_k_face: Tensor
    to_v_face: Tensor
    heads: int = 8

    @staticmethod
    def from_tensors(base: Mapping[str, Tensor], adapter_layer: Mapping[str, Tensor], heads: int = 8,
                     dtype: torch.dtype | None = None) -> "OfficialAttn2":
        """base: to_q/to_k/to_v/to_out weights and to_out_bias; adapter_layer: one official index's
        tensors named as in animator.ckpt without the index ("to_q_lora.up.weight", ...)."""
        def cast(t: Tensor) -> Tensor:
            return t.detach().to(dtype) if dtype is not None else t.detach()

        lora = {name: (cast(adapter_layer[f"{name}_lora.up.weight"]), cast(adapter_layer[f"{name}_lora.down.weight"]))
                for name in ("to_q", "to_k", "to_v", "to_out")}
        return OfficialAttn2(cast(base["to_q"]), cast(base["to_k"]), cast(base["to_v"]), cast(base["to_out"]),
                             cast(base["to_out_bias"]), lora, cast(adapter_layer["to_k_face.weight"]),
                             cast(adapter_layer["to_v_face.weight"]), heads)


def lora_linear(x: Tensor, weight: Tensor, lora: tuple[Tensor, Tensor], bias: Tensor | None = None) -> Tensor:
    """W x + b + up(down(x)): the base projection plus the rank-r LoRA delta, computed separately."""
    up, down = lora
    return torch.nn.functional.linear(x, weight, bias) + (x @ down.T) @ up.T


def unfused_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q kᵀ · D^-1/2) v with the score matrix materialised, as diffusers' AttnProcessor does."""
    batch, _, width = q.shape
    head_dim = width // heads

    def split(x: Tensor) -> Tensor:
        # (B, L, H*D) -> (B*H, L, D)
        return x.reshape(batch, -1, heads, head_dim).transpose(1, 2).reshape(batch * heads, -1, head_dim)

    q, k, v = split(q), split(k), split(v)
    scores = torch.baddbmm(torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=q.dtype, device=q.device),
                           q, k.transpose(1, 2), beta=0, alpha=head_dim ** -0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)
    # (B*H, Lq, D) -> (B, Lq, H*D)
    return out.reshape(batch, heads, -1, head_dim).transpose(1, 2).reshape(batch, -1, width)


def official_attn2(hidden: Tensor, context: Tensor, layer: OfficialAttn2, scale: float) -> Tensor:
    """attn2 output (B·F, HW, C) for hidden states (B·F, HW, C) and context (B·F, 77+16, 768),
    following official §6 steps 1-7."""
    text, face = context[:, :-FACE_TOKENS], context[:, -FACE_TOKENS:]
    q = lora_linear(hidden, layer.to_q, layer.lora["to_q"])
    k = lora_linear(text, layer.to_k, layer.lora["to_k"])
    v = lora_linear(text, layer.to_v, layer.lora["to_v"])
    text_out = unfused_attention(q, k, v, layer.heads)
    # Face keys/values from each row's own copy of the tokens: re-projected per frame, per call.
    face_k = torch.nn.functional.linear(face, layer.to_k_face)
    face_v = torch.nn.functional.linear(face, layer.to_v_face)
    face_out = unfused_attention(q, face_k, face_v, layer.heads)
    return lora_linear(text_out + scale * face_out, layer.to_out, layer.lora["to_out"], layer.to_out_bias)


def official_context(text_context: Tensor, face_tokens: Tensor) -> Tensor:
    """The official per-frame context: text (B·F,77,768) with face tokens (B·F,16,768) appended."""
    return torch.cat([text_context, face_tokens.to(text_context).expand(text_context.shape[0], -1, -1)], dim=1)
