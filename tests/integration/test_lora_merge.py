"""The LoRA ApplyFaceAdapter merges is the one ComfyUI samples with: inside real sampling runs every
one of the 64 attn2 weights (16 layers x q/k/v/out) of the live model equals W + strength·up@down,
with W read from the UNet file and up/down from animator.ckpt directly (official §3.3: no alpha, no
rank scaling), for positive, fractional, negative and zero strengths. A patch key ComfyUI does not
know is dropped by it without a word, so every key is checked to reach the model and change it;
and unpatching gives the base weights back."""
from __future__ import annotations

import pytest
import torch

from support.attn2_reference import (MODEL_NAMES, adapter_tensors, base_attn2_weights, capturing_weights,
                                     lora_deltas, sample)
from support.graphs import ADAPTER, UNET


@pytest.fixture(scope="module")
def bed(identity_bed, model_files):
    unet, ida, embeds = identity_bed.unet, identity_bed.ida, identity_bed.embeds
    base = {name: w.float() for name, w in base_attn2_weights(model_files["diffusion_models"][UNET]).items()}
    deltas = lora_deltas(adapter_tensors(model_files["id_animator"][ADAPTER]))
    return unet, ida, embeds, base, deltas


def apply(comfy, model, ida, embeds, lora_strength):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    return node.execute(model, ida, embeds, 0.8, 0.0, 1.0, lora_strength, None).args[0]


def live_weights(comfy, model) -> dict[str, torch.Tensor]:
    """The 64 weights as the one UNet call of a 1-frame, 1-step, cfg 1 run saw them."""
    captured: list[dict] = []
    sample(comfy, capturing_weights(model, MODEL_NAMES, captured), frames=1, steps=1, cfg=1.0)
    assert len(captured) == 1
    return captured[0]


def test_every_lora_key_is_a_model_weight(comfy, bed):
    unet, ida, embeds, _, _ = bed
    patched = apply(comfy, unet, ida, embeds, 1.0)
    state = patched.model_state_dict()
    assert sorted(patched.patches) == sorted(MODEL_NAMES)  # add_patches keeps only keys the model has
    assert all(name in state for name in MODEL_NAMES)
    assert all(len(patched.patches[name]) == 1 for name in MODEL_NAMES)


@pytest.mark.parametrize("strength", [1.0, 0.5, -0.75, 0.0])
def test_sampled_weights_are_base_plus_strength_times_up_down(comfy, bed, strength):
    unet, ida, embeds, base, deltas = bed
    live = live_weights(comfy, apply(comfy, unet, ida, embeds, strength))
    for name in MODEL_NAMES:
        expected = base[name] + strength * deltas[name]
        torch.testing.assert_close(live[name].float(), expected, rtol=1e-5, atol=1e-6, msg=name)
        if strength != 0.0:
            # the delta is ~10% of W here, far above the tolerance: an ignored key fails
            assert (live[name].float() - base[name]).abs().max() > 1e-3 * abs(strength), name
        else:
            assert torch.equal(live[name].float(), base[name]), name


def test_unpatching_restores_the_base_weights(comfy, bed):
    unet, ida, embeds, base, _ = bed
    live_weights(comfy, apply(comfy, unet, ida, embeds, 1.0))
    plain = live_weights(comfy, unet)
    for name in MODEL_NAMES:
        assert torch.equal(plain[name].float(), base[name]), name
