"""`zero_y` as UniAnimateConditioning computes it (ComfyUI's SD2.1 text encoder, loaded by
ComfyUI's own text-encoder loader, encoding "") equals the official recipe computed here in plain
torch from the same weights: OpenCLIP tokens [SOT, EOT, 0 × 75], token + position embedding, the
text blocks except the last one with the causal mask, then ln_final (reference §4.4, pitfall 3).
Random weights at the real size (24 blocks of 1024)."""
from __future__ import annotations

import importlib
import sys

import torch

SOT, EOT = 49406, 49407
HEADS = 16


def official_zero_y(state: dict[str, torch.Tensor]) -> torch.Tensor:
    def linear(x, name):
        return x @ state[f"{name}.weight"].T + state[f"{name}.bias"]

    def norm(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"])

    tokens = torch.tensor([SOT, EOT] + [0] * 75)
    x = state["text_model.embeddings.token_embedding.weight"][tokens] + state["text_model.embeddings.position_embedding.weight"]
    causal = torch.full((77, 77), float("-inf")).triu(1)
    for i in range(23):  # all but the last of the 24 blocks
        p = f"text_model.encoder.layers.{i}"
        h = norm(x, f"{p}.layer_norm1")
        q, k, v = (linear(h, f"{p}.self_attn.{n}_proj").view(77, HEADS, 64).transpose(0, 1) for n in "qkv")
        attention = torch.softmax(q @ k.transpose(1, 2) / 8.0 + causal, dim=-1) @ v
        x = x + linear(attention.transpose(0, 1).reshape(77, 1024), f"{p}.self_attn.out_proj")
        x = x + linear(torch.nn.functional.gelu(linear(norm(x, f"{p}.layer_norm2"), f"{p}.mlp.fc1")), f"{p}.mlp.fc2")
    return norm(x, "text_model.final_layer_norm")[None]


def test_zero_y_is_the_official_empty_prompt_embedding(comfy):
    import comfy.sd as comfy_sd
    from comfy.text_encoders import sd2_clip

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in sd2_clip.SD2ClipHModel(dtype=torch.float32).transformer.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state = {k: (1.0 + 0.1 * torch.randn(s, generator=generator)) if ("layer_norm" in k and k.endswith("weight"))
             else 0.02 * torch.randn(s, generator=generator) for k, s in shapes.items()}
    # fp32, to check the recipe (ComfyUI picks fp16 for text encoders by default: ~1e-3 from rounding)
    clip = comfy_sd.load_text_encoder_state_dicts([dict(state)], clip_type=comfy_sd.CLIPType.STABLE_DIFFUSION,
                                                  model_options={"dtype": torch.float32})
    tokens = clip.tokenize("")
    assert [t for t, _ in tokens["h"][0]] == [SOT, EOT] + [0] * 75  # OpenCLIP's padding with 0

    pack = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["UniAnimateConditioning"].__module__.rsplit(".nodes.", 1)[0]]
    conditioning = importlib.import_module(f"{pack.__name__}.nodes.unianimate_conditioning")
    ours = conditioning.zero_y(clip)
    expected = official_zero_y(state)
    assert ours.shape == (1, 77, 1024)
    error = float((ours - expected).abs().max() / expected.abs().max())
    print(f"zero_y relative error {error:.2e}")
    assert error < 1e-5
