"""The UniAnimate UNet's constructor values, as the official inference actually builds it.

The official model is built from `configs/UniAnimate_infer.yaml` merged over the global defaults
in `tools/modules/config.py` (a shallow dict update), so part of the architecture comes from the
defaults file, not the yaml: `attn_scales` is [1, 1/2, 1/4] (the class default [1/2, 1/4, 1/8] is
never used), and `concat_dim` keeps the class default 8. The reference pose, the reference latent,
the local image and the CLIP image embedding are all live (`video_compositions` lists 'image',
'local_image', 'dwpose', 'randomref', 'randomref_pose'). Every number below has that source.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UniAnimateConfig:
    in_dim: int = 4  # latent channels of the SD2.1 VAE
    dim: int = 320  # base width
    context_dim: int = 1024  # OpenCLIP ViT-H/14 text and image width
    out_dim: int = 4  # the UNet predicts v for the 4 latent channels
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    head_dim: int = 64  # every spatial/temporal attention uses width // head_dim heads of 64 ...
    num_heads: int = 8  # ... except the temporal transformer after the input conv (8 heads: width 512)
    num_tokens: int = 4  # image tokens projected from the CLIP image embedding
    concat_dim: int = 8  # pose / local-image feature channels concatenated to the latent
    randomref_dim: int = 4  # reference-latent channels (official hard-codes 4)
    attn_scales: tuple[float, ...] = field(default=(1.0, 0.5, 0.25))  # from the global defaults
    adapter_layers: int = 1  # depth of the per-pixel temporal transformers of the pose adapters
    text_tokens: int = 77  # zero_y: the empty prompt's OpenCLIP-H penultimate embedding
    group_norm_groups: int = 32

    @property
    def embed_dim(self) -> int:
        """Width of the timestep embedding (official: 4 * dim)."""
        return 4 * self.dim

    @property
    def reference_dim(self) -> int:
        """Channels of the reference frame 0: the 8 condition channels plus the 4 latent ones."""
        return self.concat_dim + self.randomref_dim

    @property
    def context_tokens(self) -> int:
        """Cross-attention tokens per frame: zero_y plus the image tokens (77 + 4 = 81)."""
        return self.text_tokens + self.num_tokens


OFFICIAL = UniAnimateConfig()  # unianimate_16f_32f_non_ema_223000.pth
