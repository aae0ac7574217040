"""The ID-Animator Resampler: CLIP ViT-H/14 penultimate features (B,257,1280) -> 16 face tokens.

A Perceiver-Resampler (official `faceadapter/resampler.py`, same design and hyper-parameters as
IP-Adapter-Plus SD1.5). Parameter names match the official `image_proj` state dict key for key,
so `load_state_dict(strict=True)` takes the 51 official tensors unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .clip_image import CLIP_SIZE as CLIP_IMAGE_SIZE  # the one CLIP input side
from .errors import IDAnimatorError
from .layer_map import TEXT_CONTEXT_DIM


@dataclass(frozen=True)
class ResamplerConfig:
    """The Resampler's sizes, the one place they are written. The defaults are official §3.2:
    Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
    output_dim=768, ff_mult=4), the IP-Adapter-Plus SD1.5 layout (51 tensors, 29,918,208
    parameters); other sizes serve models trained at other widths (tiny test UNets)."""

    dim: int = 768
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280  # CLIP ViT-H/14 hidden width
    output_dim: int = TEXT_CONTEXT_DIM  # the UNet's cross-attention width (SD1.5: 768)
    ff_mult: int = 4


class PerceiverAttention(torch.nn.Module):
    """Latent queries attend to [image features ‖ latents] (official PerceiverAttention)."""

    def __init__(self, dim: int, dim_head: int, heads: int, *, operations: Any = torch.nn,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        self.dim_head = dim_head
        self.heads = heads
        self.norm1 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.norm2 = operations.LayerNorm(dim, device=device, dtype=dtype)
        self.to_q = operations.Linear(dim, inner_dim, bias=False, device=device, dtype=dtype)
        # One projection for both: the first inner_dim output rows are K, the last are V.
        self.to_kv = operations.Linear(dim, inner_dim * 2, bias=False, device=device, dtype=dtype)
        self.to_out = operations.Linear(inner_dim, dim, bias=False, device=device, dtype=dtype)

    def _split_heads(self, x: Tensor) -> Tensor:
        batch, length, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D)
        return x.reshape(batch, length, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """Attention output for the latents (the caller adds the residual)."""
        x = self.norm1(x)
        latents = self.norm2(latents)
        q = self._split_heads(self.to_q(latents))
        # Keys/values see the image features and the latents themselves (Flamingo).
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        k, v = self._split_heads(k), self._split_heads(v)
        # (q*s)(k*s)^T with s = D^-1/4: the usual 1/sqrt(D), split so fp16 does not overflow.
        s = self.dim_head ** -0.25
        scores = (q * s) @ (k * s).transpose(-2, -1)
        weights = torch.softmax(scores.float(), dim=-1).to(scores.dtype)  # softmax in fp32
        out = weights @ v
        batch, _, length, _ = out.shape
        # (B, H, Lq, D) -> (B, Lq, H*D)
        out = out.transpose(1, 2).reshape(batch, length, self.heads * self.dim_head)
        return self.to_out(out)


def feed_forward(dim: int, mult: int, *, operations: Any = torch.nn,
                 device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> torch.nn.Sequential:
    """LayerNorm -> Linear(dim, mult*dim) -> exact GELU -> Linear(mult*dim, dim), no biases."""
    inner_dim = dim * mult
    return torch.nn.Sequential(
        operations.LayerNorm(dim, device=device, dtype=dtype),
        operations.Linear(dim, inner_dim, bias=False, device=device, dtype=dtype),
        torch.nn.GELU(),
        operations.Linear(inner_dim, dim, bias=False, device=device, dtype=dtype),
    )


class Resampler(torch.nn.Module):
    """16 learned queries summarise the face crop's CLIP features (paper: facial latent queries)."""

    def __init__(self, config: ResamplerConfig = ResamplerConfig(), operations: Any = torch.nn, *,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dim, embedding_dim, output_dim = config.dim, config.embedding_dim, config.output_dim
        self.config = config
        self.embedding_dim = embedding_dim
        self.num_queries = num_queries = config.num_queries
        self.output_dim = output_dim
        self.latents = torch.nn.Parameter(
            torch.randn(1, num_queries, dim, device=device, dtype=dtype) / dim ** 0.5)
        self.proj_in = operations.Linear(embedding_dim, dim, device=device, dtype=dtype)
        self.proj_out = operations.Linear(dim, output_dim, device=device, dtype=dtype)
        self.norm_out = operations.LayerNorm(output_dim, device=device, dtype=dtype)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList([
                PerceiverAttention(dim, config.dim_head, config.heads, operations=operations,
                                   device=device, dtype=dtype),
                feed_forward(dim, config.ff_mult, operations=operations, device=device, dtype=dtype),
            ])
            for _ in range(config.depth)
        )

    def forward(self, clip_penultimate: Tensor) -> Tensor:
        """Penultimate CLIP states (B, 257, embedding_dim) -> (B, num_queries, output_dim)."""
        if clip_penultimate.ndim != 3 or clip_penultimate.shape[-1] != self.embedding_dim:
            raise IDAnimatorError(
                f"The ID-Animator Resampler expects CLIP vision features of shape "
                f"(batch, tokens, {self.embedding_dim}) but got {tuple(clip_penultimate.shape)}. "
                f"Load the OpenCLIP ViT-H/14 vision model (CLIP-ViT-H-14-laion2B-s32B-b79K) "
                f"in models/clip_vision/, not ViT-L/14 or ViT-bigG.")
        x = self.proj_in(clip_penultimate)
        # (1, Q, dim) -> (B, Q, dim); cast so comfy.ops manual-cast models compute in x's dtype.
        latents = self.latents.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


def uncond_tokens(vision_tower: Callable[[Tensor], Tensor], resampler: Resampler, *,
                  device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> Tensor:
    """Negative face tokens (16, 768): Resampler(CLIP(zeros)) on an all-zero *normalized* image.

    Official §4.4: the zero tensor is fed after CLIP normalisation (a mean-grey image), which is
    neither zero tokens nor a black photo. `vision_tower` maps normalized pixels
    (B,3,224,224) to penultimate hidden states (B,257,1280).
    """
    if device is None:
        device = next(resampler.parameters()).device
    pixels = torch.zeros(1, 3, CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE, device=device, dtype=dtype)
    with torch.no_grad():
        tokens = resampler(vision_tower(pixels))
    return tokens[0]
