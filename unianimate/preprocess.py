"""UniAnimate's input transforms (official `utils/transforms.py` as the entrance uses them; reference
§4.2, pitfall 15): every resize is PIL's bilinear on the 8-bit image, stretched to the target size
(no aspect preservation, no crop). Images here are ComfyUI-style [N, H, W, 3] floats in 0..1 that
hold 8-bit values (as LoadImage makes them), so the round trip through uint8 is exact.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

CLIP_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # tools/modules/config.py vit_mean
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # vit_std


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    return (image[..., :3].clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


def pil_resize(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[N, H, W, 3] 0..1 → [N, height, width, 3] 0..1 by PIL bilinear on 8 bits (a no-op at the size)."""
    if images.shape[1:3] == (height, width):
        return images[..., :3]
    out = [np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
           for frame in _to_uint8(images)]
    return torch.from_numpy(np.stack(out)).float() / 255.0


def clip_pixels(image: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] 0..1 → CLIP-normalized [N, 3, 224, 224]: the stretched 224² bilinear resize."""
    pixels = pil_resize(image, CLIP_SIZE, CLIP_SIZE).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


def frames_first(images: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] → [1, 3, N, H, W], the official video layout of pose and local-image inputs."""
    return images[..., :3].permute(3, 0, 1, 2).unsqueeze(0).contiguous()
