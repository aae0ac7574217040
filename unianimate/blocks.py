"""The UniAnimate UNet's building blocks, with the official parameter names (read from the code).

Every layer is built through `ops` (default `torch.nn`; ComfyUI passes `comfy.ops`), and every
spatial/temporal attention goes through `attention(q, k, v, heads)` on [N, L, heads*dim_head]
tensors (default `sdpa_attention`; ComfyUI passes `optimized_attention`, same signature). Blocks
that mix frames take `frames` (F+1 per sample) explicitly: the official code reads it from a
mutable `self.batch` on the module instead.

Layout conventions: "folded" tensors are [(B*frames), C, h, w] with frames inner (the official
`(b f)` order); the temporal layers unfold them to [B, C, frames, h, w].
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

Operations = Any  # torch.nn or comfy.ops.* : a namespace with Linear, Conv1d/2d/3d, GroupNorm, LayerNorm


class AttentionFn(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor: ...


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Softmax attention with scale dim_head^-0.5 on [N, L, heads*dim_head] (xformers' maths)."""
    n, _, inner = q.shape
    q, k, v = (rearrange(t, "n l (h d) -> n h l d", h=heads) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "n h l d -> n l (h d)", h=heads)


def _factory(dtype: torch.dtype | None, device: torch.device | str | None) -> dict[str, Any]:
    return {"dtype": dtype, "device": device}


class CrossAttention(nn.Module):
    """q from x, k/v from the context (or x): official `MemoryEfficientCrossAttention`."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None, *,
                 ops: Operations = nn, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        inner, kw = heads * dim_head, _factory(dtype, device)
        self.heads = heads
        self.to_q = ops.Linear(query_dim, inner, bias=False, **kw)
        self.to_k = ops.Linear(context_dim or query_dim, inner, bias=False, **kw)
        self.to_v = ops.Linear(context_dim or query_dim, inner, bias=False, **kw)
        self.to_out = nn.ModuleList([ops.Linear(inner, query_dim, **kw)])  # official [Linear, Dropout]

    def forward(self, x: Tensor, attention: AttentionFn, context: Tensor | None = None,
                frames: int = 1) -> Tensor:
        """`context` [B, T, C] is shared by the `frames` rows of each sample in x [(B*frames), L, C]:
        its keys and values are projected once per sample, then repeated (same numbers as
        projecting the repeated context, as the official code does)."""
        source = x if context is None else context
        k, v = self.to_k(source), self.to_v(source)
        if context is not None and context.shape[0] != x.shape[0]:
            k, v = k.repeat_interleave(frames, dim=0), v.repeat_interleave(frames, dim=0)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads))


class GEGLUFeedForward(nn.Module):
    """value * GELU(gate) from one projection to 2*4C, then 4C -> C (official `FeedForward`, glu)."""

    def __init__(self, dim: int, *, ops: Operations = nn, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        kw = _factory(dtype, device)
        self.net = nn.ModuleList([_Projection(dim, 4 * dim, ops, kw), nn.Identity(),
                                  ops.Linear(4 * dim, dim, **kw)])  # net.1 is the (inactive) Dropout

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.net[0].proj(x).chunk(2, dim=-1)
        return self.net[2](value * F.gelu(gate))


class _Projection(nn.Module):
    def __init__(self, dim: int, inner: int, ops: Operations, kw: dict[str, Any]) -> None:
        super().__init__()
        self.proj = ops.Linear(dim, 2 * inner, **kw)


class TransformerBlock(nn.Module):
    """x += attn1(LN x); x += attn2(LN x, context); x += FF(LN x) (official `BasicTransformerBlock`).

    With `context_dim=None`, attn2 is a second self-attention (the temporal transformers)."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int | None, *,
                 ops: Operations = nn, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        kw = dict(ops=ops, dtype=dtype, device=device)
        self.attn1 = CrossAttention(dim, heads, dim_head, **kw)
        self.ff = GEGLUFeedForward(dim, **kw)
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim, **kw)
        self.norm1 = ops.LayerNorm(dim, dtype=dtype, device=device)
        self.norm2 = ops.LayerNorm(dim, dtype=dtype, device=device)
        self.norm3 = ops.LayerNorm(dim, dtype=dtype, device=device)

    def forward(self, x: Tensor, attention: AttentionFn, context: Tensor | None = None,
                frames: int = 1) -> Tensor:
        x = self.attn1(self.norm1(x), attention) + x
        x = self.attn2(self.norm2(x), attention, context, frames) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame attention over h*w tokens with cross-attention to the 81 context tokens."""

    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int, groups: int, *,
                 ops: Operations = nn, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        inner, kw = heads * dim_head, _factory(dtype, device)
        self.norm = ops.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.proj_in = ops.Linear(channels, inner, **kw)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, context_dim, ops=ops, dtype=dtype, device=device)])
        self.proj_out = ops.Linear(channels, inner, **kw)  # official (in, inner) order; in == inner

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        _, _, h, w = x.shape
        tokens = self.proj_in(rearrange(self.norm(x), "n c h w -> n (h w) c"))
        for block in self.transformer_blocks:
            tokens = block(tokens, attention, context, frames)
        return rearrange(self.proj_out(tokens), "n (h w) c -> n c h w", h=h, w=w) + x


class TemporalTransformer(nn.Module):
    """Per-pixel self-attention over the F+1 frames of a sample, reference frame 0 included.

    No positional encoding and no mask (official `TemporalTransformer`, only_self_att); the
    GroupNorm pools all frames of a sample."""

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int, *,
                 ops: Operations = nn, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        inner, kw = heads * dim_head, _factory(dtype, device)
        self.norm = ops.GroupNorm(groups, channels, eps=1e-6, affine=True, **kw)
        self.proj_in = ops.Conv1d(channels, inner, 1, **kw)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(inner, heads, dim_head, None, ops=ops, dtype=dtype, device=device)])
        self.proj_out = ops.Conv1d(inner, channels, 1, **kw)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        _, _, h, w = x.shape
        video = rearrange(x, "(b f) c h w -> b c f h w", f=frames)
        tokens = rearrange(self.norm(video), "b c f h w -> (b h w) c f")
        tokens = rearrange(self.proj_in(tokens), "n c f -> n f c")
        for block in self.transformer_blocks:
            tokens = block(tokens, attention)
        tokens = self.proj_out(rearrange(tokens, "n f c -> n c f"))
        return x + rearrange(tokens, "(b h w) c f -> (b f) c h w", h=h, w=w)


def _temporal_conv(channels: int, groups: int, ops: Operations, kw: dict[str, Any], dropout: bool) -> nn.Sequential:
    """GN -> SiLU -> (Dropout) -> Conv3d with a temporal kernel of 3 (official `TemporalConvBlock_v2`)."""
    conv = ops.Conv3d(channels, channels, (3, 1, 1), padding=(1, 0, 0), **kw)
    layers = [ops.GroupNorm(groups, channels, **kw), nn.SiLU()] + ([nn.Identity()] if dropout else []) + [conv]
    return nn.Sequential(*layers)


class TemporalConv(nn.Module):
    """x + conv4(conv3(conv2(conv1(x)))) along the frames of [B, C, F+1, h, w]."""

    def __init__(self, channels: int, groups: int, ops: Operations, kw: dict[str, Any]) -> None:
        super().__init__()
        self.conv1 = _temporal_conv(channels, groups, ops, kw, dropout=False)
        self.conv2 = _temporal_conv(channels, groups, ops, kw, dropout=True)
        self.conv3 = _temporal_conv(channels, groups, ops, kw, dropout=True)
        self.conv4 = _temporal_conv(channels, groups, ops, kw, dropout=True)

    def forward(self, video: Tensor) -> Tensor:
        return video + self.conv4(self.conv3(self.conv2(self.conv1(video))))


class ResBlock(nn.Module):
    """Conv(SiLU(GN x)) + Linear(SiLU e), Conv(SiLU(GN h)), skip; then the temporal-conv residual."""

    def __init__(self, channels: int, emb_dim: int, out_channels: int, groups: int, *,
                 ops: Operations = nn, dtype: torch.dtype | None = None, device: Any = None) -> None:
        super().__init__()
        kw = _factory(dtype, device)
        self.in_layers = nn.Sequential(ops.GroupNorm(groups, channels, **kw), nn.SiLU(),
                                       ops.Conv2d(channels, out_channels, 3, padding=1, **kw))
        self.emb_layers = nn.Sequential(nn.SiLU(), ops.Linear(emb_dim, out_channels, **kw))
        self.out_layers = nn.Sequential(ops.GroupNorm(groups, out_channels, **kw), nn.SiLU(), nn.Identity(),
                                        ops.Conv2d(out_channels, out_channels, 3, padding=1, **kw))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else ops.Conv2d(channels, out_channels, 1, **kw))
        self.temopral_conv = TemporalConv(out_channels, groups, ops, kw)  # sic: the official key

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        """`emb` is [B, E], one row per sample, broadcast over that sample's frames."""
        h = self.in_layers(x)
        e = self.emb_layers(emb).to(h.dtype).repeat_interleave(frames, dim=0)
        h = self.skip_connection(x) + self.out_layers(h + e[:, :, None, None])
        video = self.temopral_conv(rearrange(h, "(b f) c h w -> b c f h w", f=frames))
        return rearrange(video, "b c f h w -> (b f) c h w")


class Downsample(nn.Module):
    """Conv3x3 stride 2 (official key `input_blocks.N.op`, not wrapped in a list)."""

    def __init__(self, channels: int, *, ops: Operations = nn, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1, dtype=dtype, device=device)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest x2, then Conv3x3."""

    def __init__(self, channels: int, *, ops: Operations = nn, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        self.conv = ops.Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Step(nn.ModuleList):
    """One `input_blocks.N` / `output_blocks.N` / `middle_block` entry: layers run in order.
    UNet layers take (x, emb, context, frames, attention); a bare conv (the input conv) takes x."""

    def forward(self, x: Tensor, emb: Tensor, context: Tensor, frames: int, attention: AttentionFn) -> Tensor:
        for layer in self:
            x = layer(x, emb, context, frames, attention) if isinstance(layer, UNET_LAYERS) else layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# The condition adapters (official `Transformer_v2` and the conv stems)


class HalfSizePool(nn.Module):
    """Average-pool to (H//2, W//2) of the input. The official AdaptiveAvgPool2d fixes that size
    at construction from the configured resolution, so only inputs of that size were valid; for
    them this is the same operation."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % 2 == 0 and w % 2 == 0:
            return F.avg_pool2d(x, 2)
        return F.adaptive_avg_pool2d(x, (h // 2, w // 2))


def pose_stem(out_dim: int, hidden: int, ops: Operations, kw: dict[str, Any]) -> nn.Sequential:
    """Image [N,3,H,W] -> [N,out_dim,H/8,W/8]: conv, SiLU, pool /2, conv /2, SiLU, conv /2."""
    return nn.Sequential(ops.Conv2d(3, hidden, 3, padding=1, **kw), nn.SiLU(), HalfSizePool(),
                         ops.Conv2d(hidden, hidden, 3, stride=2, padding=1, **kw), nn.SiLU(),
                         ops.Conv2d(hidden, out_dim, 3, stride=2, padding=1, **kw))


def latent_stem(in_dim: int, out_dim: int, hidden: int, ops: Operations, kw: dict[str, Any]) -> nn.Sequential:
    """Reference latent [N,4,h,w] -> [N,out_dim,h,w]: three 3x3 convs with SiLU between."""
    return nn.Sequential(ops.Conv2d(in_dim, hidden, 3, padding=1, **kw), nn.SiLU(),
                         ops.Conv2d(hidden, hidden, 3, padding=1, **kw), nn.SiLU(),
                         ops.Conv2d(hidden, out_dim, 3, padding=1, **kw))


class AdapterAttention(nn.Module):
    """2 heads of width d on d channels, fused qkv projection (official local `Attention`)."""

    def __init__(self, dim: int, heads: int, ops: Operations, kw: dict[str, Any]) -> None:
        super().__init__()
        self.heads = heads
        self.to_qkv = ops.Linear(dim, 3 * heads * dim, bias=False, **kw)
        self.to_out = nn.ModuleList([ops.Linear(heads * dim, dim, **kw)])

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out[0](sdpa_attention(q, k, v, self.heads))


class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module, ops: Operations, kw: dict[str, Any]) -> None:
        super().__init__()
        self.norm = ops.LayerNorm(dim, **kw)
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(self.norm(x)) + x


class AdapterFeedForward(nn.Module):
    """Linear d -> 4d, exact GELU, Linear 4d -> d (no pre-norm: the official FF has none)."""

    def __init__(self, dim: int, ops: Operations, kw: dict[str, Any]) -> None:
        super().__init__()
        self.net = nn.ModuleList([nn.Sequential(ops.Linear(dim, 4 * dim, **kw), nn.GELU()), nn.Identity(),
                                  ops.Linear(4 * dim, dim, **kw)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


class FrameTransformer(nn.Module):
    """Per-pixel transformer over frames for condition features (official `Transformer_v2`):
    x += Attn(LN x); x += FF(x), `depth` times, on [N, frames, d]."""

    def __init__(self, dim: int, depth: int, *, ops: Operations = nn, dtype: torch.dtype | None = None,
                 device: Any = None) -> None:
        super().__init__()
        kw = _factory(dtype, device)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PreNorm(dim, AdapterAttention(dim, 2, ops, kw), ops, kw), AdapterFeedForward(dim, ops, kw)])
             for _ in range(depth)])

    def forward(self, x: Tensor) -> Tensor:
        for attn, ff in self.layers:
            x = attn(x)
            x = ff(x) + x
        return x


def embed_frames(stem: nn.Module, after: FrameTransformer, frames: Tensor) -> Tensor:
    """Condition frames [B,c,F,H,W] -> features [B,d,F,h,w]: the stem per frame, then the
    per-pixel transformer across the F frames."""
    b = frames.shape[0]
    features = stem(rearrange(frames, "b c f h w -> (b f) c h w"))
    h = features.shape[2]
    sequences = after(rearrange(features, "(b f) c h w -> (b h w) f c", b=b))
    return rearrange(sequences, "(b h w) f c -> b c f h w", b=b, h=h)


UNET_LAYERS = (ResBlock, SpatialTransformer, TemporalTransformer, Downsample, Upsample)
