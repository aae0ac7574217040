"""bench/official_reference.py (per-step unmerged LoRA, per-frame face K/V, non-fused attention)
computes what our merged formulation computes, so the benchmark compares equal outputs."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from id_animator.adapter.face_attention import batch_face_kv, decoupled_attention, project_face_tokens
from id_animator.adapter.layer_map import TEXT_CONTEXT_DIM, layer_by_index

REL_TOL = 1e-5
RANK = 128  # the official rank: the per-step LoRA cost being benchmarked depends on it


def load_reference():
    path = Path(__file__).resolve().parents[2] / "bench" / "official_reference.py"
    spec = importlib.util.spec_from_file_location("bench_official_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


reference = load_reference()


def random_layer(channels: int, generator: torch.Generator) -> tuple[dict, dict]:
    """Base attn2 weights (N(0, 1/fan_in)) and one adapter index's tensors (LoRA std 0.02)."""
    def rand(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    base = {"to_q": rand(channels, channels, std=channels ** -0.5),
            "to_k": rand(channels, TEXT_CONTEXT_DIM, std=TEXT_CONTEXT_DIM ** -0.5),
            "to_v": rand(channels, TEXT_CONTEXT_DIM, std=TEXT_CONTEXT_DIM ** -0.5),
            "to_out": rand(channels, channels, std=channels ** -0.5), "to_out_bias": rand(channels, std=0.1)}
    adapter = {"to_k_face.weight": rand(channels, TEXT_CONTEXT_DIM, std=TEXT_CONTEXT_DIM ** -0.5),
               "to_v_face.weight": rand(channels, TEXT_CONTEXT_DIM, std=TEXT_CONTEXT_DIM ** -0.5)}
    for target, fan_in in (("to_q", channels), ("to_k", TEXT_CONTEXT_DIM), ("to_v", TEXT_CONTEXT_DIM),
                           ("to_out", channels)):
        adapter[f"{target}_lora.down.weight"] = rand(RANK, fan_in, std=0.02)
        adapter[f"{target}_lora.up.weight"] = rand(channels, RANK, std=0.02)
    return base, adapter


def merged_attn2(hidden, text, face_tokens, uncond_tokens, chunks, base, adapter, scale, heads):
    """Our formulation: LoRA merged into the weights, face K/V projected once and laid out per chunk."""
    def merged(target: str) -> torch.Tensor:
        return base[target] + adapter[f"{target}_lora.up.weight"] @ adapter[f"{target}_lora.down.weight"]

    q, k, v = F.linear(hidden, merged("to_q")), F.linear(text, merged("to_k")), F.linear(text, merged("to_v"))
    face_k, face_v = project_face_tokens(face_tokens, adapter["to_k_face.weight"], adapter["to_v_face.weight"])
    unc_k, unc_v = project_face_tokens(uncond_tokens, adapter["to_k_face.weight"], adapter["to_v_face.weight"])
    frames = hidden.shape[0] // len(chunks)
    keys, values = batch_face_kv(face_k, unc_k, chunks, frames), batch_face_kv(face_v, unc_v, chunks, frames)
    out = decoupled_attention(q, k, v, keys, values, scale, heads)
    return F.linear(out, merged("to_out"), base["to_out_bias"])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("index, chunks, scale", [(1, [1, 0], 0.8), (5, [0, 1], 1.0), (31, [1, 0], 0.5)])
def test_official_reference_equals_merged_formulation(index, chunks, scale) -> None:
    layer = layer_by_index(index)
    generator = torch.Generator().manual_seed(index)
    base, adapter = random_layer(layer.channels, generator)
    frames, tokens = 3, 12
    hidden = torch.randn(len(chunks) * frames, tokens, layer.channels, generator=generator)
    text = torch.randn(len(chunks) * frames, 77, TEXT_CONTEXT_DIM, generator=generator)
    face_tokens = torch.randn(frames, 16, TEXT_CONTEXT_DIM, generator=generator)  # one mix per frame
    uncond_tokens = torch.randn(1, 16, TEXT_CONTEXT_DIM, generator=generator)

    official_layer = reference.OfficialAttn2.from_tensors(base, adapter, heads=8)
    per_row_tokens = batch_face_kv(face_tokens, uncond_tokens, chunks, frames)  # (B·F,16,768)
    context = reference.official_context(text, per_row_tokens)
    assert context.shape == (len(chunks) * frames, 77 + 16, TEXT_CONTEXT_DIM)
    official = reference.official_attn2(hidden, context, official_layer, scale)
    ours = merged_attn2(hidden, text, face_tokens, uncond_tokens, chunks, base, adapter, scale, heads=8)
    assert official.shape == hidden.shape
    assert rel_err(official, ours) <= REL_TOL

    # The comparison can fail: dropping the LoRA or the face branch changes the output.
    no_lora = dict(adapter, **{f"{t}_lora.up.weight": torch.zeros_like(adapter[f"{t}_lora.up.weight"])
                               for t in ("to_q", "to_k", "to_v", "to_out")})
    without_lora = reference.official_attn2(hidden, context, reference.OfficialAttn2.from_tensors(base, no_lora), scale)
    assert rel_err(without_lora, ours) > 1e-3
    without_face = reference.official_attn2(hidden, context, official_layer, 0.0)
    assert rel_err(without_face, ours) > 1e-3


def test_unfused_attention_matches_sdpa() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, n, 320, generator=generator) for n in (20, 77, 77))
    from id_animator.adapter.face_attention import sdpa_attention

    assert rel_err(reference.unfused_attention(q, k, v, 8), sdpa_attention(q, k, v, 8)) <= REL_TOL
