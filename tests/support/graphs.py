"""API-format graphs for the tests, built from small pieces (node ids are strings)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

UNET = "sd15_random_unet.safetensors"
TEXT_ENCODER = "clip_l_random.safetensors"
CLIP_VISION = "CLIP-ViT-H-14-random.safetensors"
ADAPTER = "animator.ckpt"
DETECTOR = "scrfd"


def sampling_graph(frames: int = 4, size: int = 64, steps: int = 2, seed: int = 0, cfg: float = 2.0,
                   model: list | None = None, prefix: str = "smoke") -> dict[str, Any]:
    """UNETLoader + CLIPLoader -> KSampler over a `frames`-long latent batch -> SaveLatent."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT_ENCODER, "type": "stable_diffusion"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "a person smiling"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": frames}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": model or ["unet", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def saved_latent(output_dir: Path, ui_output: dict) -> torch.Tensor:
    """Read back the LATENT a SaveLatent node wrote (its UI output names the file)."""
    item = ui_output["latents"][0]
    path = output_dir / item.get("subfolder", "") / item["filename"]
    return load_file(str(path))["latent_tensor"]
