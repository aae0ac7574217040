"""ApplyFaceAdapter stacks with other attn2 patches, by numbers, in real sampling runs. Two chained
nodes give text + λa·face_a + λb·face_b at every layer, over a LoRA merged once (W + up@down, not
2·up@down). A patch another pack registered under ComfyUI's (block, number, 0) key, which ComfyUI
looks up before (block, number), as IPAdapter registers it, keeps running as the text branch under
ours. References come from animator.ckpt, the UNet file and the recorded q/k/v (support.attn2_reference)."""
from __future__ import annotations

import pytest
import torch

from support.attn2_reference import (INDEX_OF_KEY, MODEL_NAMES, SPEC_LAYERS, adapter_tensors, attention,
                                     base_attn2_weights, capturing_weights, face_branch, lora_deltas, recording,
                                     rel_err, sample, text_branch)
from support.graphs import ADAPTER, UNET

REL_TOL = 2e-5


@pytest.fixture(scope="module")
def bed(identity_bed, model_files):
    return identity_bed.unet, identity_bed.ida, identity_bed.embeds, identity_bed.embeds_mirrored, adapter_tensors(model_files["id_animator"][ADAPTER])


def apply(comfy, model, ida, embeds, weight, lora_strength=1.0):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    return node.execute(model, ida, embeds, weight, 0.0, 1.0, lora_strength, None).args[0]


def face(call, layers, embeds):
    return face_branch(call, layers[INDEX_OF_KEY[call["key"][:2]]], embeds.face_tokens[:1], embeds.uncond_tokens)


def test_chained_adapters_add_both_face_branches_over_one_merged_lora(comfy, bed, model_files):
    unet, ida, embeds_a, embeds_b, layers = bed
    chained = apply(comfy, apply(comfy, unet, ida, embeds_a, 0.8), ida, embeds_b, 0.5)
    calls, captured = [], []
    sample(comfy, capturing_weights(recording(chained, calls), MODEL_NAMES, captured), frames=2, steps=1)
    base = base_attn2_weights(model_files["diffusion_models"][UNET])
    deltas = lora_deltas(layers)
    for name in MODEL_NAMES:
        torch.testing.assert_close(captured[0][name].float(), base[name].float() + deltas[name],
                                   rtol=1e-5, atol=1e-6, msg=name)
    assert len(calls) == 16
    for call in calls:
        text, face_a, face_b = text_branch(call), face(call, layers, embeds_a), face(call, layers, embeds_b)
        assert rel_err(call["out"], text + 0.8 * face_a + 0.5 * face_b) <= REL_TOL, call["key"]
        assert rel_err(call["out"], text + 0.5 * face_b) > 100 * REL_TOL  # A's branch is visible


class HalvedTextAttention:
    """Stands in for another pack's attn2 patch: a text branch ours must keep, not replace."""

    def __init__(self):
        self.calls = 0

    def __call__(self, q, k, v, extra_options):
        self.calls += 1
        return (0.5 * attention(q, k, v, extra_options["n_heads"])).to(q.dtype)


def test_patch_under_the_indexed_key_is_wrapped_not_replaced(comfy, bed):
    unet, ida, embeds, _, layers = bed
    other = unet.clone()
    foreign = HalvedTextAttention()
    indexed_keys = {(block, number, 0) for _, (block, number) in SPEC_LAYERS.values()}
    for key in indexed_keys:
        other.set_model_attn2_replace(foreign, *key)
    calls: list[dict] = []
    sample(comfy, recording(apply(comfy, other, ida, embeds, 0.8, lora_strength=0.0), calls), frames=1, steps=1)
    assert {c["key"] for c in calls} == indexed_keys  # what ComfyUI called: the (block, number, 0) patches
    assert foreign.calls == 16
    for call in calls:
        expected = 0.5 * text_branch(call) + 0.8 * face(call, layers, embeds)
        assert rel_err(call["out"], expected) <= REL_TOL, call["key"]
    registered = other.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert all(registered[key] is foreign for key in indexed_keys)  # the upstream MODEL keeps its patch
