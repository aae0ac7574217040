"""CLIP image preprocessing, once for the node, the trainer and the scorer.

Equal to transformers' PIL `CLIPImageProcessor` (transformers 4.x; `CLIPImageProcessorPil` in 5.x),
the processor the official pipeline and IP-Adapter feed OpenCLIP ViT-H/14 with (official §4.2):
RGB, the shortest side resized to 224 with the long side *truncated* (`int(224 * long / short)`,
transformers `get_resize_output_image_size`), PIL bicubic, the centred 224 x 224 crop (offsets
floored), values / 255, normalised with OpenAI CLIP's mean and std.

- `clip_geometry(image_rgb) -> uint8 (224, 224, 3)`: resize + centre crop;
- `normalize(pixels) -> Tensor`: (B, 3, H, W) in [0, 1] -> CLIP-normalised;
- `clip_pixels(images_rgb) -> Tensor (B, 3, 224, 224)`: both, for a list of RGB uint8 images;
- `CLIP_MEAN`, `CLIP_STD`: the normalisation (transformers `OPENAI_CLIP_MEAN/STD`; ComfyUI's
  clip_vision configs repeat them). An image at CLIP_MEAN normalises to exactly zero: the
  official null face (§4.4).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .errors import IDAnimatorError

CLIP_SIZE = 224  # OpenCLIP ViT-H/14 input side (official image_encoder/config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(height: int, width: int, size: int = CLIP_SIZE) -> tuple[int, int]:
    """(height, width) after resizing the shortest side to `size`, the long side truncated."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def clip_geometry(image_rgb: np.ndarray, size: int = CLIP_SIZE) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3): shortest side to `size` (PIL bicubic), centre crop."""
    from PIL import Image

    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise IDAnimatorError(f"clip_geometry takes an RGB uint8 (H, W, 3) image, got {image_rgb.dtype} "
                         f"{tuple(image_rgb.shape)}")
    height, width = image_rgb.shape[:2]
    new_height, new_width = resized_size(height, width, size)
    resized = np.asarray(Image.fromarray(image_rgb).resize((new_width, new_height), Image.Resampling.BICUBIC))
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[top:top + size, left:left + size]


def normalize(pixels: Tensor) -> Tensor:
    """(B, 3, H, W) floats in [0, 1] (or uint8) -> CLIP-normalised float32 on the same device."""
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise IDAnimatorError(f"CLIP normalisation takes (B, 3, H, W) RGB pixels, got {tuple(pixels.shape)}")
    x = pixels.float() / 255.0 if pixels.dtype == torch.uint8 else pixels.float()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def mean_colour(like: Tensor) -> Tensor:
    """CLIP's mean colour as (1, 3, 1, 1) on `like`'s device: the pixels that normalise to zero."""
    return torch.tensor(CLIP_MEAN, device=like.device).view(1, 3, 1, 1)


def clip_pixels(images_rgb: Sequence[np.ndarray], size: int = CLIP_SIZE) -> Tensor:
    """RGB uint8 images of any sizes -> (B, 3, size, size) CLIP input, as CLIPImageProcessor."""
    crops = np.stack([clip_geometry(image, size) for image in images_rgb])  # (B, size, size, 3)
    return normalize(torch.from_numpy(crops).permute(0, 3, 1, 2))
