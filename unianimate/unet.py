"""The UniAnimate video UNet (official `UNetSD_UniAnimate`), with the official state-dict layout.

`UniAnimateUNet(config, operations=torch.nn, attention=sdpa_attention, dtype=None, device=None)`
builds the 1544 tensors (1,416,564,300 parameters, no buffers) of
`unianimate_16f_32f_non_ema_223000.pth`, so `load_state_dict(official, strict=True)` takes the
file unchanged. The forward pass is the official inference forward (eval mode: every dropout
inactive) with no state kept between calls:

    v = unet(x, t, pose=..., reference_latent=..., local_image=..., image_embed=..., zero_y=...,
             present=None)

- `x` [B, 4, F, h, w]: the noisy latent (h = H/8, w = W/8; h and w divisible by 8).
- `t` [B]: raw integer-valued timesteps 0..999 (float or int; no rescaling).
- `pose` [B, 3, F+1, H, W] in [0, 1]: the reference pose at frame 0, then the F driving poses.
- `reference_latent` [B, 4, h, w] or [B, 4, F', h, w] (only frame 0 is used): the reference
  image's VAE latent (times 0.18215). Needs `pose` (its frame 0 is the reference pose).
- `local_image` [B, 3, F, H, W] in [0, 1]: the official "local image" first-frame route.
- `image_embed` [B, 1024] or [B, 1, 1024]: the OpenCLIP ViT-H/14 pooled, projected image embedding.
- `zero_y` [1 or B, 77, 1024]: the empty prompt's OpenCLIP ViT-H penultimate text embedding
  (required: the official model holds it as a constructor attribute).
- `present`: optional {"pose" | "reference_latent" | "local_image" | "image_embed": bool [B]}.
  Sample i with present[name][i] False is computed exactly as if that condition were None for it,
  while the other samples use the tensor (its rows for sample i are ignored, whatever they hold,
  NaN included). This lets a ComfyUI wrapper batch the conditional and unconditional passes.
- Returns v [B, 4, F, h, w] in x's dtype.

A condition passed as None means what it means in the official code: pose, reference and local
image add nothing (zeros after their adapters; not black images through the adapters), and no
image embedding gives 4 zero context tokens. The reference pose (frame 0 of `pose`) contributes
only together with the reference latent, as in the official code.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .blocks import (AttentionFn, Downsample, FrameTransformer, ResBlock, SpatialTransformer, Step,
                     TemporalTransformer, Upsample, embed_frames, latent_stem, pose_stem, sdpa_attention)
from .config import OFFICIAL, UniAnimateConfig
from .errors import UniAnimateInputError

CONDITIONS = ("pose", "reference_latent", "local_image", "image_embed")


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos(t w_i), sin(t w_i)] with w_i = 10000^(-i/half), cos first (official `sinusoidal_embedding`)."""
    half = dim // 2
    t = t.float()
    freqs = torch.pow(10000, -torch.arange(half, device=t.device).to(t).div(half))
    args = torch.outer(t, freqs)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class UniAnimateUNet(nn.Module):
    def __init__(self, config: UniAnimateConfig = OFFICIAL, operations: Any = nn,
                 attention: AttentionFn = sdpa_attention, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        c, ops = config, operations
        kw: dict[str, Any] = dict(ops=ops, dtype=dtype, device=device)
        fk: dict[str, Any] = dict(dtype=dtype, device=device)
        self.config, self.attention = config, attention
        groups, emb_dim, hidden = c.group_norm_groups, c.embed_dim, 4 * c.concat_dim

        self.time_embed = nn.Sequential(ops.Linear(c.dim, emb_dim, **fk), nn.SiLU(), ops.Linear(emb_dim, emb_dim, **fk))
        self.pre_image_condition = nn.Sequential(ops.Linear(c.context_dim, c.context_dim, **fk), nn.SiLU(),
                                                 ops.Linear(c.context_dim, c.context_dim * c.num_tokens, **fk))
        self.local_image_embedding = pose_stem(c.concat_dim, hidden, ops, fk)
        self.local_image_embedding_after = FrameTransformer(c.concat_dim, c.adapter_layers, **kw)
        self.dwpose_embedding = pose_stem(c.concat_dim, hidden, ops, fk)
        self.dwpose_embedding_after = FrameTransformer(c.concat_dim, c.adapter_layers, **kw)
        self.randomref_pose2_embedding = pose_stem(c.reference_dim, hidden, ops, fk)
        self.randomref_pose2_embedding_after = FrameTransformer(c.reference_dim, c.adapter_layers, **kw)
        self.randomref_embedding2 = latent_stem(c.randomref_dim, c.reference_dim, hidden, ops, fk)
        self.randomref_embedding_after2 = FrameTransformer(c.reference_dim, c.adapter_layers, **kw)

        def attention_layers(width: int) -> list[nn.Module]:
            heads = width // c.head_dim
            return [SpatialTransformer(width, heads, c.head_dim, c.context_dim, groups, **kw),
                    TemporalTransformer(width, heads, c.head_dim, groups, **kw)]

        # encoder (official loop: a ResBlock per level and repeat, attention where the scale is listed)
        enc_dims = [c.dim * m for m in (1, *c.dim_mult)]
        dec_dims = [c.dim * m for m in (c.dim_mult[-1], *reversed(c.dim_mult))]
        self.input_blocks = nn.ModuleList([Step([
            ops.Conv2d(c.in_dim + c.concat_dim, c.dim, 3, padding=1, **fk),
            TemporalTransformer(c.dim, c.num_heads, c.head_dim, groups, **kw)])])
        skip_dims, scale = [c.dim], 1.0
        for level, (cin, cout) in enumerate(zip(enc_dims[:-1], enc_dims[1:])):
            for repeat in range(c.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(cin, emb_dim, cout, groups, **kw)]
                if scale in c.attn_scales:
                    layers += attention_layers(cout)
                cin = cout
                self.input_blocks.append(Step(layers))
                skip_dims.append(cout)
                if level != len(c.dim_mult) - 1 and repeat == c.num_res_blocks - 1:
                    self.input_blocks.append(Downsample(cout, **kw))
                    skip_dims.append(cout)
                    scale /= 2.0

        self.middle_block = Step([ResBlock(cout, emb_dim, cout, groups, **kw), *attention_layers(cout),
                                  ResBlock(cout, emb_dim, cout, groups, **kw)])

        self.output_blocks = nn.ModuleList()
        for level, (cin, cout) in enumerate(zip(dec_dims[:-1], dec_dims[1:])):
            for repeat in range(c.num_res_blocks + 1):
                layers = [ResBlock(cin + skip_dims.pop(), emb_dim, cout, groups, **kw)]
                if scale in c.attn_scales:
                    layers += attention_layers(cout)
                cin = cout
                if level != len(c.dim_mult) - 1 and repeat == c.num_res_blocks:
                    layers.append(Upsample(cout, **kw))
                    scale *= 2.0
                self.output_blocks.append(Step(layers))

        self.out = nn.Sequential(ops.GroupNorm(groups, cout, **fk), nn.SiLU(),
                                 ops.Conv2d(cout, c.out_dim, 3, padding=1, **fk))

    # -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor, t: Tensor, *, pose: Tensor | None = None, reference_latent: Tensor | None = None,
                local_image: Tensor | None = None, image_embed: Tensor | None = None,
                zero_y: Tensor | None = None, present: Mapping[str, Tensor] | None = None,
                attention: AttentionFn | None = None) -> Tensor:
        """v for x at t (see the module docstring for every argument)."""
        c = self.config
        b, _, f, h, w = _check_inputs(c, x, t, pose, reference_latent, local_image, image_embed, zero_y, present)
        masks = {name: present[name].to(device=x.device, dtype=torch.bool) for name in (present or {})}
        dtype = x.dtype

        def gated(name: str, features: Tensor) -> Tensor:
            """Features with the samples whose condition is absent set to exactly zero."""
            if name not in masks:
                return features
            # where, not a product: an absent sample's rows may hold anything (even NaN)
            keep = masks[name].view(-1, *([1] * (features.ndim - 1)))
            return torch.where(keep, features, features.new_zeros(()))

        # 8 condition channels per frame: local image and driving poses, summed
        concat: Tensor | None = None
        if local_image is not None:
            concat = gated("local_image", embed_frames(self.local_image_embedding, self.local_image_embedding_after,
                                                       local_image.to(dtype)))
        if pose is not None:
            poses = gated("pose", embed_frames(self.dwpose_embedding, self.dwpose_embedding_after,
                                               pose[:, :, 1:].to(dtype)))
            concat = poses if concat is None else concat + poses
        if concat is None:
            concat = x.new_zeros(b, c.concat_dim, f, h, w)

        # frame 0: the reference latent plus the reference pose, 12 channels, no noisy latent
        if reference_latent is not None:
            latent = reference_latent[:, :, :1] if reference_latent.ndim == 5 else reference_latent[:, :, None]
            reference = embed_frames(self.randomref_embedding2, self.randomref_embedding_after2, latent.to(dtype))
            reference = reference + embed_frames(self.randomref_pose2_embedding, self.randomref_pose2_embedding_after,
                                                 pose[:, :, :1].to(dtype))
            reference = gated("reference_latent", reference)
        else:
            reference = x.new_zeros(b, c.reference_dim, 1, h, w)
        video = torch.cat([reference, torch.cat([x, concat], dim=1)], dim=2)  # [B, 12, F+1, h, w]
        frames = f + 1

        emb = self.time_embed(timestep_embedding(t.reshape(-1).expand(b), c.dim).to(dtype))  # [B, E]
        text = zero_y.to(dtype).expand(b, -1, -1)
        if image_embed is not None:
            tokens = gated("image_embed", self.pre_image_condition(image_embed.to(dtype).reshape(b, 1, -1))
                           .view(b, c.num_tokens, c.context_dim))
        else:
            tokens = text.new_zeros(b, c.num_tokens, c.context_dim)
        context = torch.cat([text, tokens], dim=1)  # [B, 81, 1024], shared by the F+1 frames of a sample

        attend = attention or self.attention
        hidden = video.transpose(1, 2).reshape(b * frames, -1, h, w)  # (b f) c h w
        skips = []
        for block in self.input_blocks:
            hidden = block(hidden, emb, context, frames, attend)
            skips.append(hidden)
        hidden = self.middle_block(hidden, emb, context, frames, attend)
        for block in self.output_blocks:
            hidden = block(torch.cat([hidden, skips.pop()], dim=1), emb, context, frames, attend)
        out = self.out(hidden)
        out = out.reshape(b, frames, c.out_dim, h, w).transpose(1, 2)
        return out[:, :, 1:]  # the reference frame 0 is not part of the video


def _shape(t: Tensor | None) -> str:
    return "None" if t is None else str(list(t.shape))


def _check_inputs(c: UniAnimateConfig, x: Tensor, t: Tensor, pose: Tensor | None, reference: Tensor | None,
                  local_image: Tensor | None, image_embed: Tensor | None, zero_y: Tensor | None,
                  present: Mapping[str, Tensor] | None) -> tuple[int, int, int, int, int]:
    """(B, C, F, h, w) of x, after checking every input against it; errors say what to pass."""
    if x.ndim != 5 or x.shape[1] != c.in_dim:
        raise UniAnimateInputError(f"UniAnimate UNet: x must be a video latent [B, {c.in_dim}, F, h, w]; "
                                   f"got {_shape(x)}.")
    b, _, f, h, w = x.shape
    factor = 2 ** (len(c.dim_mult) - 1)
    if h % factor or w % factor:
        raise UniAnimateInputError(
            f"UniAnimate UNet: the latent is {h}x{w}, but its height and width must be divisible by {factor} "
            f"(images divisible by {8 * factor}, e.g. 768x512): resize the pose frames and the reference.")
    if t.numel() not in (1, b):
        raise UniAnimateInputError(f"UniAnimate UNet: t must hold 1 or {b} timesteps; got {_shape(t)}.")
    expected = {"pose": (b, 3, f + 1, 8 * h, 8 * w), "local_image": (b, 3, f, 8 * h, 8 * w)}
    for name, value in (("pose", pose), ("local_image", local_image)):
        if value is not None and tuple(value.shape) != expected[name]:
            extra = " (frame 0 is the reference pose, then one pose per video frame)" if name == "pose" else ""
            raise UniAnimateInputError(f"UniAnimate UNet: {name} must be {list(expected[name])}{extra} for a latent "
                                       f"{list(x.shape)}; got {_shape(value)}.")
    if reference is not None:
        if reference.ndim not in (4, 5) or reference.shape[:2] != (b, c.randomref_dim) or reference.shape[-2:] != (h, w):
            raise UniAnimateInputError(f"UniAnimate UNet: reference_latent must be [{b}, {c.randomref_dim}, {h}, {w}] "
                                       f"(or with a frame axis); got {_shape(reference)}.")
        if pose is None:
            raise UniAnimateInputError("UniAnimate UNet: reference_latent needs pose too: the reference pose "
                                       "(frame 0 of the pose frames) is part of the reference frame.")
    if image_embed is not None and image_embed.numel() != b * c.context_dim:
        raise UniAnimateInputError(f"UniAnimate UNet: image_embed must be [{b}, {c.context_dim}] (the CLIP ViT-H/14 "
                                   f"image embedding); got {_shape(image_embed)}.")
    if zero_y is None:
        raise UniAnimateInputError("UniAnimate UNet: zero_y is required: the empty prompt's OpenCLIP ViT-H text "
                                   f"embedding [1, {c.text_tokens}, {c.context_dim}].")
    if zero_y.ndim != 3 or zero_y.shape[0] not in (1, b) or zero_y.shape[1:] != (c.text_tokens, c.context_dim):
        raise UniAnimateInputError(f"UniAnimate UNet: zero_y must be [1 or {b}, {c.text_tokens}, {c.context_dim}]; "
                                   f"got {_shape(zero_y)}.")
    given = {"pose": pose, "reference_latent": reference, "local_image": local_image, "image_embed": image_embed}
    for name, mask in (present or {}).items():
        if name not in given:
            raise UniAnimateInputError(f"UniAnimate UNet: present has an unknown condition {name!r}; "
                                       f"known: {', '.join(CONDITIONS)}.")
        if mask.shape != (b,):
            raise UniAnimateInputError(f"UniAnimate UNet: present[{name!r}] must be a bool tensor [{b}]; got {_shape(mask)}.")
        if given[name] is None:
            raise UniAnimateInputError(f"UniAnimate UNet: present[{name!r}] given but {name} is None.")
    if present and "reference_latent" in present and "pose" in present:
        if bool((present["reference_latent"].bool() & ~present["pose"].bool()).any()):
            raise UniAnimateInputError("UniAnimate UNet: a sample has reference_latent but no pose; the reference "
                                       "pose (frame 0 of the pose frames) is part of the reference frame.")
    return b, x.shape[1], f, h, w
