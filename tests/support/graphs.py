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


def id_nodes(photo: str = "astronaut.png", prefix: str = "") -> dict[str, Any]:
    """LoadIDAnimator + LoadImage + FaceEncode (+ a preview of its crops, so the graph has an
    output), node ids prefixed so several can coexist."""
    return {
        f"{prefix}ida": {"class_type": "LoadIDAnimator", "inputs": {
            "adapter_name": ADAPTER, "clip_vision_name": CLIP_VISION, "face_detector": DETECTOR, "provider": "CPU"}},
        f"{prefix}photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        f"{prefix}encode": {"class_type": "FaceEncode", "inputs": {
            "id_animator": [f"{prefix}ida", 0], "image": [f"{prefix}photo", 0], "face_select": "most confident",
            "face_index": 0, "on_no_face": "error"}},
        f"{prefix}crops": {"class_type": "PreviewImage", "inputs": {"images": [f"{prefix}encode", 1]}},
    }


def apply_node(model: list, embeds: list, ida: list, weight: float = 0.8, start_at: float = 0.0,
               end_at: float = 1.0, lora_strength: float = 1.0, mask: list | None = None) -> dict[str, Any]:
    inputs = {"model": model, "id_animator": ida, "face_embeds": embeds, "weight": weight,
              "start_at": start_at, "end_at": end_at, "lora_strength": lora_strength}
    if mask is not None:
        inputs["attn_mask"] = mask
    return {"class_type": "ApplyFaceAdapter", "inputs": inputs}


def face_video_graph(frames: int = 4, weight: float = 0.8, lora_strength: float = 1.0, start_at: float = 0.0,
                     end_at: float = 1.0, seed: int = 0, prefix: str = "face") -> dict[str, Any]:
    """The smallest identity graph: sampling_graph with ApplyFaceAdapter between UNet and KSampler."""
    graph = sampling_graph(frames=frames, seed=seed, model=["apply", 0], prefix=prefix)
    graph.update(id_nodes())
    graph["apply"] = apply_node(["unet", 0], ["encode", 0], ["ida", 0], weight, start_at, end_at, lora_strength)
    return graph


def id_mix_graph(blend: float, blend_end: float, frames: int = 2, steps: int = 1,
                 prefix: str = "mix") -> dict[str, Any]:
    """Two people (the astronaut, the largest Solvay face) -> IDMix -> ApplyFaceAdapter -> KSampler."""
    graph = sampling_graph(frames=frames, steps=steps, model=["apply", 0], prefix=prefix)
    graph.update(id_nodes())
    person_b = id_nodes("solvay_1927.jpg", prefix="b_")
    del person_b["b_ida"]  # one LoadIDAnimator for both people, as in the shipped id_mix workflow
    person_b["b_encode"]["inputs"].update(id_animator=["ida", 0], face_select="largest")
    graph.update(person_b)
    graph["mix"] = {"class_type": "IDMix", "inputs": {
        "embeds_a": ["encode", 0], "embeds_b": ["b_encode", 0], "blend": blend, "blend_end": blend_end}}
    graph["apply"] = apply_node(["unet", 0], ["mix", 0], ["ida", 0], weight=1.0, lora_strength=0.0)
    return graph
