"""FaceEncode's tokens from an independent route (issue 13, item 2): the aligned 224 crops it
encoded, normalised by transformers' CLIPImageProcessor, through transformers' CLIP vision model
(the same random ViT-H/14 weights), its penultimate hidden state, then diffusers'
IP-Adapter-Plus projection with the adapter's Resampler weights. Equal to the node's output at
fp32 (relative error <= 1e-5), several photos averaged, and the unconditional tokens from the
all-zero *normalised* image."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from id_animator.adapter.checkpoint import load_adapter_checkpoint
from support.diffusers_reference import official_to_diffusers
from support.graphs import ADAPTER, CLIP_VISION, id_nodes

transformers = pytest.importorskip("transformers")
diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")

# OpenCLIP ViT-H/14 in transformers' terms (the IP-Adapter SD1.5 image encoder's config.json).
VIT_H = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
             patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def reference(model_files):
    """transformers' CLIP vision tower and diffusers' Resampler, loaded from the test bed's files."""
    vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**VIT_H)).eval()
    state = load_file(str(model_files["clip_vision"][CLIP_VISION]))
    missing, unexpected = vision.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids"}, (missing, unexpected)
    projection = diffusers_embeddings.IPAdapterPlusImageProjection(
        embed_dims=1280, output_dims=768, hidden_dims=768, depth=4, dim_head=64, heads=12, num_queries=16,
        ffn_ratio=4).eval()
    weights = load_adapter_checkpoint(model_files["id_animator"][ADAPTER])
    projection.load_state_dict(official_to_diffusers({k: v.float() for k, v in weights.resampler.items()}))
    processor = transformers.CLIPImageProcessor(do_resize=False, do_center_crop=False)  # the crop is 224 already

    def tokens(pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            hidden = vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]
            return projection(hidden)

    return processor, tokens


def test_face_tokens_equal_the_transformers_and_diffusers_route(comfy, reference):
    graph = id_nodes("astronaut.png")
    graph.update({f"b_{k}": v for k, v in id_nodes("newton.png").items() if k == "photo"})
    graph["batch"] = {"class_type": "ImageBatch", "inputs": {"image1": ["photo", 0], "image2": ["b_photo", 0]}}
    graph["encode"]["inputs"]["image"] = ["batch", 0]
    result = comfy.run(graph)
    assert result.success, result.error_message
    embeds = comfy.loop.run_until_complete(comfy.executor.caches.outputs.get("encode")).outputs
    face_embeds, crops = embeds[0][0], embeds[1][0]
    assert crops.shape == (2, 224, 224, 3), "both photos must have been encoded"

    processor, tokens = reference
    photos = [(crop.numpy() * 255).round().astype("uint8") for crop in crops]  # the crops are k/255 exactly
    pixels = processor(images=photos, return_tensors="pt")["pixel_values"]
    per_photo = tokens(pixels)  # (2, 16, 768)
    assert relative_error(face_embeds.face_tokens[0], per_photo.mean(0)) <= 1e-5
    assert relative_error(per_photo[0], per_photo[1]) > 1e-2, "two different photos must give different tokens"

    uncond = tokens(torch.zeros(1, 3, 224, 224))[0]  # zero after normalisation: a mean-grey image
    assert relative_error(face_embeds.uncond_tokens, uncond) <= 1e-5
    black_photo = tokens(processor(images=[photos[0] * 0], return_tensors="pt")["pixel_values"])[0]
    assert relative_error(face_embeds.uncond_tokens, black_photo) > 1e-3, "uncond must not be a black photo"
