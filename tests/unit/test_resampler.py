"""Resampler: official key layout, parity with diffusers' IP-Adapter-Plus projection, uncond tokens."""
from __future__ import annotations

import pytest
import torch

from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.resampler import Resampler, uncond_tokens
from support.diffusers_reference import official_to_diffusers

diffusers_embeddings = pytest.importorskip("diffusers.models.embeddings")

DEPTH = 4


def official_image_proj_shapes() -> dict[str, tuple[int, ...]]:
    """The 51 `image_proj` keys and shapes of animator.ckpt (official spec §3.2)."""
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, 16, 768),
        "proj_in.weight": (768, 1280), "proj_in.bias": (768,),
        "proj_out.weight": (768, 768), "proj_out.bias": (768,),
        "norm_out.weight": (768,), "norm_out.bias": (768,),
    }
    for layer in range(DEPTH):
        attn, ff = f"layers.{layer}.0", f"layers.{layer}.1"
        shapes |= {
            f"{attn}.norm1.weight": (768,), f"{attn}.norm1.bias": (768,),
            f"{attn}.norm2.weight": (768,), f"{attn}.norm2.bias": (768,),
            f"{attn}.to_q.weight": (768, 768),
            f"{attn}.to_kv.weight": (1536, 768),
            f"{attn}.to_out.weight": (768, 768),
            f"{ff}.0.weight": (768,), f"{ff}.0.bias": (768,),
            f"{ff}.1.weight": (3072, 768),
            f"{ff}.3.weight": (768, 3072),
        }
    return shapes


def randomize_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights of a realistic scale, LayerNorm affine parameters included."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and name.endswith("weight"):  # LayerNorm gain
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
            else:
                param.copy_(noise / param.shape[-1] ** 0.5)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def resampler() -> Resampler:
    model = Resampler()
    randomize_(model, torch.Generator().manual_seed(0))
    return model.eval()


def test_parameters_match_official_image_proj_keys(resampler: Resampler) -> None:
    expected = official_image_proj_shapes()
    assert len(expected) == 51
    state = resampler.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(v.numel() for v in state.values()) == 29_918_208


def test_loads_official_state_dict_strictly(resampler: Resampler) -> None:
    generator = torch.Generator().manual_seed(1)
    official = {k: torch.randn(s, generator=generator) for k, s in official_image_proj_shapes().items()}
    fresh = Resampler()
    fresh.load_state_dict(official, strict=True)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, official[key]), key


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers_ip_adapter_plus_projection(resampler: Resampler, batch: int) -> None:
    reference = diffusers_embeddings.IPAdapterPlusImageProjection(
        embed_dims=1280, output_dims=768, hidden_dims=768, depth=4, dim_head=64, heads=12,
        num_queries=16, ffn_ratio=4).eval()
    reference.load_state_dict(official_to_diffusers(resampler.state_dict()), strict=True)
    clip_penultimate = torch.randn(batch, 257, 1280, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = resampler(clip_penultimate)
        theirs = reference(clip_penultimate)
    assert ours.shape == (batch, 16, 768)
    assert relative_error(ours, theirs) <= 1e-5


def test_batch_rows_are_independent(resampler: Resampler) -> None:
    clip_penultimate = torch.randn(3, 257, 1280, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        batched = resampler(clip_penultimate)
        single = resampler(clip_penultimate[1:2])
    assert relative_error(batched[1:2], single) <= 1e-5


def test_rejects_vit_l_features(resampler: Resampler) -> None:
    with pytest.raises(IDAnimatorError, match="ViT-H"):
        resampler(torch.zeros(1, 257, 1024))


class PatchTower(torch.nn.Module):
    """A tiny stand-in for CLIP ViT-H/14: patchify (16x16 patches of 14 px) plus a CLS token."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(3, 1280, kernel_size=14, stride=14)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 1280))
        self.seen: list[torch.Tensor] = []

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.seen.append(pixels)
        patches = self.patch(pixels).flatten(2).transpose(1, 2)  # (B, 1280, 16, 16) -> (B, 256, 1280)
        return torch.cat((self.cls.expand(pixels.shape[0], -1, -1), patches), dim=1)


def test_uncond_tokens_run_zero_normalized_pixels(resampler: Resampler) -> None:
    torch.manual_seed(4)
    tower = PatchTower()
    tokens = uncond_tokens(tower, resampler)
    (pixels,) = tower.seen
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == torch.float32
    assert not pixels.any()
    with torch.no_grad():
        expected = resampler(tower(torch.zeros(1, 3, 224, 224)))[0]
    assert tokens.shape == (16, 768)
    assert torch.equal(tokens, expected)
    # A black photo, once CLIP-normalised, is not the zero tensor and gives other tokens.
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    with torch.no_grad():
        black = resampler(tower((torch.zeros(1, 3, 224, 224) - mean) / std))[0]
    assert not torch.allclose(tokens, black)
