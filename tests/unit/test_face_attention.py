"""Decoupled face attention: one attn2 layer end to end against diffusers' IP-Adapter processor."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.face_attention import (
    batch_face_kv, decoupled_attention, mix_identities, project_face_tokens, sdpa_attention)
from id_animator.adapter.identity import FaceEmbeds, Identity, blend, single_identity
from id_animator.adapter.layer_map import LAYERS
from id_animator.adapter.lora import attn2_lora_pairs
from support.mixing import mixed_tokens

attention_processor = pytest.importorskip("diffusers.models.attention_processor")

RANK = 128
HEADS = 8  # SD1.5 attn2
CONTEXT = 768
FRAMES = 3
PIXELS = 24  # spatial tokens per frame (tiny latent)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


class UnmergedLoRALinear(torch.nn.Module):
    """W x + b + up(down(x)): the LoRA applied as the official code does, never merged."""

    def __init__(self, base: torch.nn.Linear, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.base, self.up, self.down = base, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


def random_adapter_layer(channels: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One official adapter index's tensors (§3.3), named without the index prefix."""
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / shape[-1] ** 0.5

    tensors = {"to_k_face.weight": rand(channels, CONTEXT), "to_v_face.weight": rand(channels, CONTEXT)}
    for target, fan_in in (("to_q", channels), ("to_k", CONTEXT), ("to_v", CONTEXT), ("to_out", channels)):
        tensors[f"{target}_lora.down.weight"] = rand(RANK, fan_in)
        tensors[f"{target}_lora.up.weight"] = 0.5 * rand(channels, RANK)
    return tensors


def reference_attn2(channels: int, scale: float, base: dict[str, torch.Tensor],
                    adapter: dict[str, torch.Tensor]) -> torch.nn.Module:
    """diffusers Attention + IPAdapterAttnProcessor2_0 with the LoRAs wrapped around the Linears."""
    attn = attention_processor.Attention(query_dim=channels, cross_attention_dim=CONTEXT,
                                         heads=HEADS, dim_head=channels // HEADS)
    with torch.no_grad():
        attn.to_q.weight.copy_(base["to_q"])
        attn.to_k.weight.copy_(base["to_k"])
        attn.to_v.weight.copy_(base["to_v"])
        attn.to_out[0].weight.copy_(base["to_out"])
        attn.to_out[0].bias.copy_(base["to_out_bias"])
    processor = attention_processor.IPAdapterAttnProcessor2_0(
        hidden_size=channels, cross_attention_dim=CONTEXT, num_tokens=(16,), scale=scale)
    with torch.no_grad():
        processor.to_k_ip[0].weight.copy_(adapter["to_k_face.weight"])
        processor.to_v_ip[0].weight.copy_(adapter["to_v_face.weight"])
    attn.set_processor(processor)
    for name in ("to_q", "to_k", "to_v"):
        setattr(attn, name, UnmergedLoRALinear(getattr(attn, name), adapter[f"{name}_lora.up.weight"],
                                               adapter[f"{name}_lora.down.weight"]))
    attn.to_out[0] = UnmergedLoRALinear(attn.to_out[0], adapter["to_out_lora.up.weight"],
                                        adapter["to_out_lora.down.weight"])
    return attn.eval()


def face_embeds(morph: bool, generator: torch.Generator) -> FaceEmbeds:
    uncond = torch.randn(16, CONTEXT, generator=generator)
    a = single_identity(torch.randn(2, 16, CONTEXT, generator=generator), uncond)
    if not morph:
        return a
    b = single_identity(torch.randn(1, 16, CONTEXT, generator=generator), uncond)
    return blend(a, b, 0.2, 0.9)


@pytest.mark.parametrize("morph", [False, True], ids=["static", "morph"])
@pytest.mark.parametrize("cond_or_uncond", [[0, 1], [1, 0]], ids=["cond-first", "uncond-first"])
@pytest.mark.parametrize("channels", [320, 1280])
def test_attn2_layer_matches_diffusers_ip_adapter(channels: int, cond_or_uncond: list[int],
                                                 morph: bool) -> None:
    generator = torch.Generator().manual_seed(channels + 10 * cond_or_uncond[0] + morph)
    scale = 0.8
    layer = next(layer for layer in LAYERS if layer.channels == channels)
    adapter = random_adapter_layer(channels, generator)
    base = {
        "to_q": torch.randn(channels, channels, generator=generator) / channels ** 0.5,
        "to_k": torch.randn(channels, CONTEXT, generator=generator) / CONTEXT ** 0.5,
        "to_v": torch.randn(channels, CONTEXT, generator=generator) / CONTEXT ** 0.5,
        "to_out": torch.randn(channels, channels, generator=generator) / channels ** 0.5,
        "to_out_bias": 0.1 * torch.randn(channels, generator=generator),
    }
    embeds = face_embeds(morph, generator)
    batch = len(cond_or_uncond) * FRAMES
    hidden = torch.randn(batch, PIXELS, channels, generator=generator)
    text = torch.randn(batch, 77, CONTEXT, generator=generator)

    # Reference: the official layout, text(77) ‖ face(16) per row, the face tokens per chunk.
    cond_tokens = mixed_tokens(embeds, range(FRAMES), FRAMES)  # (F, 16, 768)
    face_rows = torch.cat([cond_tokens if c == 0 else embeds.uncond_tokens.expand(FRAMES, -1, -1)
                           for c in cond_or_uncond])
    reference = reference_attn2(channels, scale, base, adapter)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers deprecates the concatenated context
        expected = reference(hidden, encoder_hidden_states=torch.cat((text, face_rows), dim=1))

    # Ours: LoRA merged into the weights, face K/V projected once then mixed and batched.
    pairs = attn2_lora_pairs({layer.official_index: adapter})
    keys = layer.weight_keys
    w = {name: base[name] + pairs[keys[name]].up @ pairs[keys[name]].down
         for name in ("to_q", "to_k", "to_v", "to_out")}
    face_k, face_v = project_face_tokens(embeds.face_tokens, adapter["to_k_face.weight"],
                                         adapter["to_v_face.weight"])
    uncond_k, uncond_v = project_face_tokens(embeds.uncond_tokens, adapter["to_k_face.weight"],
                                             adapter["to_v_face.weight"])
    weights = embeds.frame_weights(range(FRAMES), FRAMES)
    if embeds.is_static:
        weights = weights[:1]  # one set of tokens broadcast over the frames
    face_k = batch_face_kv(mix_identities(face_k, weights), uncond_k, cond_or_uncond, FRAMES)
    face_v = batch_face_kv(mix_identities(face_v, weights), uncond_v, cond_or_uncond, FRAMES)
    q = F.linear(hidden, w["to_q"])
    out = decoupled_attention(q, F.linear(text, w["to_k"]), F.linear(text, w["to_v"]),
                              face_k, face_v, scale, HEADS)
    ours = F.linear(out, w["to_out"], base["to_out_bias"])

    assert ours.shape == expected.shape == (batch, PIXELS, channels)
    assert relative_error(ours, expected) <= 1e-5


def test_sdpa_attention_is_multi_head_softmax() -> None:
    generator = torch.Generator().manual_seed(0)
    heads, head_dim = 4, 8
    q = torch.randn(2, 5, heads * head_dim, generator=generator)
    k = torch.randn(2, 7, heads * head_dim, generator=generator)
    v = torch.randn(2, 7, heads * head_dim, generator=generator)
    split = lambda x: x.reshape(2, -1, heads, head_dim).transpose(1, 2)  # noqa: E731
    scores = split(q) @ split(k).transpose(-2, -1) * head_dim ** -0.5
    expected = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(2, 5, heads * head_dim)
    assert relative_error(sdpa_attention(q, k, v, heads), expected) <= 1e-5


def qkv(generator: torch.Generator, batch: int = 2, width: int = 32) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 6, width, generator=generator),
            torch.randn(batch, 77, width, generator=generator),
            torch.randn(batch, 77, width, generator=generator),
            torch.randn(batch, 16, width, generator=generator),
            torch.randn(batch, 16, width, generator=generator))


def test_decoupled_attention_is_text_plus_scaled_face_with_same_query() -> None:
    q, text_k, text_v, face_k, face_v = qkv(torch.Generator().manual_seed(1))
    out = decoupled_attention(q, text_k, text_v, face_k, face_v, 0.7, heads=4)
    expected = sdpa_attention(q, text_k, text_v, 4) + 0.7 * sdpa_attention(q, face_k, face_v, 4)
    assert torch.allclose(out, expected, rtol=0, atol=1e-6)
    zero_scale = decoupled_attention(q, text_k, text_v, face_k, face_v, 0.0, heads=4)
    assert torch.equal(zero_scale, sdpa_attention(q, text_k, text_v, 4))


def test_decoupled_attention_uses_given_text_branch_and_attention_fn() -> None:
    q, text_k, text_v, face_k, face_v = qkv(torch.Generator().manual_seed(2))
    calls: list[int] = []

    def counting_attention(q, k, v, heads):
        calls.append(k.shape[1])
        return sdpa_attention(q, k, v, heads)

    text_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3))
    expected = text_out + 0.5 * sdpa_attention(q, face_k, face_v, 4)
    out = decoupled_attention(q, text_k, text_v, face_k, face_v, 0.5, 4,
                              attention=counting_attention, text_out=text_out)
    assert calls == [16]  # only the face branch was computed
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.data_ptr() == text_out.data_ptr()  # the given text branch is consumed, no temporaries


def test_face_mask_weights_face_branch_only() -> None:
    q, text_k, text_v, face_k, face_v = qkv(torch.Generator().manual_seed(4))
    text_only = sdpa_attention(q, text_k, text_v, 4)
    face_only = sdpa_attention(q, face_k, face_v, 4)
    mask = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.25]).view(1, 6, 1)  # per query token
    out = decoupled_attention(q, text_k, text_v, face_k, face_v, 0.8, 4, face_mask=mask)
    assert torch.allclose(out, text_only + 0.8 * mask * face_only, atol=1e-6)
    assert torch.equal(out[:, 1], text_only[:, 1])


def test_mixing_commutes_with_face_projection() -> None:
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randn(3, 16, CONTEXT, generator=generator)
    to_k_face = torch.randn(320, CONTEXT, generator=generator) / CONTEXT ** 0.5
    to_v_face = torch.randn(320, CONTEXT, generator=generator) / CONTEXT ** 0.5
    weights = torch.rand(5, 3, generator=generator)
    weights = weights / weights.sum(dim=1, keepdim=True)
    k_then_mix, v_then_mix = (mix_identities(x, weights)
                              for x in project_face_tokens(tokens, to_k_face, to_v_face))
    mix_then_k, mix_then_v = project_face_tokens(mix_identities(tokens, weights), to_k_face, to_v_face)
    assert k_then_mix.shape == (5, 16, 320)
    assert relative_error(k_then_mix, mix_then_k) <= 1e-5
    assert relative_error(v_then_mix, mix_then_v) <= 1e-5


@pytest.mark.parametrize("cond_or_uncond", [[0, 1], [1, 0], [0], [1], [1, 0, 0]])
def test_batch_face_kv_follows_cond_or_uncond(cond_or_uncond: list[int]) -> None:
    generator = torch.Generator().manual_seed(6)
    cond = torch.randn(FRAMES, 16, 8, generator=generator)
    uncond = torch.randn(16, 8, generator=generator)
    batched = batch_face_kv(cond, uncond, cond_or_uncond, FRAMES)
    assert batched.shape == (len(cond_or_uncond) * FRAMES, 16, 8)
    for chunk, kind in enumerate(cond_or_uncond):
        rows = batched[chunk * FRAMES:(chunk + 1) * FRAMES]
        expected = cond if kind == 0 else uncond.expand(FRAMES, -1, -1)
        assert torch.equal(rows, expected)


def test_batch_face_kv_broadcasts_single_cond_and_rejects_bad_input() -> None:
    generator = torch.Generator().manual_seed(7)
    cond = torch.randn(1, 16, 8, generator=generator)
    uncond = torch.randn(1, 16, 8, generator=generator)
    batched = batch_face_kv(cond, uncond, [1, 0], 4)
    assert torch.equal(batched[4:], cond.expand(4, -1, -1))
    assert torch.equal(batched[:4], uncond.expand(4, -1, -1))
    with pytest.raises(IDAnimatorError, match="frames"):
        batch_face_kv(torch.randn(3, 16, 8), uncond, [0, 1], 4)
    with pytest.raises(IDAnimatorError, match="cond_or_uncond"):
        batch_face_kv(cond, uncond, [0, 2], 4)


def test_mix_identities_rejects_wrong_identity_count() -> None:
    with pytest.raises(IDAnimatorError, match="identities"):
        mix_identities(torch.zeros(2, 16, 8), torch.ones(3, 3))


def test_static_embeds_mix_to_their_tokens() -> None:
    embeds = FaceEmbeds(torch.randn(1, 16, 8), torch.randn(16, 8), Identity(0))
    assert torch.equal(mix_identities(embeds.face_tokens, embeds.frame_weights([0], 1)),
                       embeds.face_tokens)
