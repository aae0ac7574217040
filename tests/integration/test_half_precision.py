"""Half precision and device moves. ComfyUI sends every attn2 patch to the load device and to the
model's weight dtype (`ModelPatcher.model_patches_to`): the patch must come back as a moved copy,
the registered one and the patch it wraps left as they were, and a bf16 copy must still compute
text + λ·face. With the UNet loaded in bf16 as `--bf16-unet` loads it (bf16 weights; on CPU ComfyUI
then computes in fp32), and with bf16 compute (ComfyUI's ModelComputeDtype node), a real sampling
run keeps the merged LoRA within one bf16 rounding of W + up@down, and each layer's face branch
stays within 3% (bf16 compute) of the fp32 reference computed from the same q/k/v."""
from __future__ import annotations

import pytest
import torch

from support.attn2_reference import (INDEX_OF_KEY, MODEL_NAMES, SPEC_LAYERS, adapter_tensors, attention,
                                     base_attn2_weights, capturing_weights, face_branch, lora_deltas, recording,
                                     rel_err, sample, text_branch)
from support.graphs import ADAPTER, UNET

# Error of the face branch relative to its largest value. bf16 keeps 8 significant bits (0.4%) and
# the branch goes through several bf16 roundings (q, face K/V, scores, output): up to 1.2% was seen.
FACE_TOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def bed(comfy, identity_bed, model_files):
    from comfy.sd import load_diffusion_model  # a plain `import comfy.sd` would shadow the fixture

    unet_file = model_files["diffusion_models"][UNET]
    unet_path = comfy.folder_paths.get_full_path_or_raise("diffusion_models", UNET)  # the generated file has no suffix
    unet = load_diffusion_model(unet_path, model_options={"dtype": torch.bfloat16})  # as --bf16-unet loads it
    ida, embeds = identity_bed.ida, identity_bed.embeds
    layers = adapter_tensors(model_files["id_animator"][ADAPTER])
    return unet, ida, embeds, layers, base_attn2_weights(unet_file)


def apply(comfy, model, ida, embeds, mask=None):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    return node.execute(model, ida, embeds, 1.0, 0.0, 1.0, 1.0, mask).args[0]


class MovableAttention:
    """Another pack's attn2 patch (plain attention) that ComfyUI can move: remembers where to."""

    def __init__(self, moves: list):
        self.moves = moves

    def __call__(self, q, k, v, extra_options):
        return attention(q, k, v, extra_options["n_heads"]).to(q.dtype)

    def to(self, device_or_dtype):
        self.moves.append(device_or_dtype)
        return MovableAttention(self.moves)


def patches_over_movable(comfy, bed, moves: list) -> dict:
    """ApplyFaceAdapter's 16 patches (with a mask) over another pack's movable patches."""
    unet, ida, embeds, _, _ = bed
    upstream = unet.clone()
    for _, (block, number) in SPEC_LAYERS.values():
        upstream.set_model_attn2_replace(MovableAttention(moves), block, number, 0)
    patched = apply(comfy, upstream, ida, embeds, mask=torch.ones(1, 64, 64))
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(patches) == 16
    return patches


def held_tensors(patch) -> list[torch.Tensor]:
    return [value for value in vars(patch).values() if torch.is_tensor(value)]


@pytest.mark.parametrize("target", [torch.device("meta"), torch.bfloat16], ids=["device", "dtype"])
def test_to_returns_a_moved_copy(comfy, bed, target):
    moves: list = []
    patches = patches_over_movable(comfy, bed, moves)
    moves.clear()  # ComfyUI itself moves patches while the nodes build the model
    for patch in patches.values():
        before = [(t.device, t.dtype) for t in held_tensors(patch)]
        moved = patch.to(target)
        assert moved is not patch and len(held_tensors(moved)) >= 5  # face K/V, uncond K/V, mask
        assert [(t.device, t.dtype) for t in held_tensors(patch)] == before  # the registered one is untouched
        for tensor in held_tensors(moved):
            assert (tensor.device if isinstance(target, torch.device) else tensor.dtype) == target
        assert isinstance(moved.previous, MovableAttention) and moved.previous is not patch.previous
    assert moves == [target] * 16  # the wrapped patch travels too


def test_patch_cast_to_bf16_still_computes_text_plus_face(comfy, bed):
    _, _, embeds, layers, _ = bed
    gen = torch.Generator().manual_seed(0)
    for key, patch in patches_over_movable(comfy, bed, []).items():
        tensors = layers[INDEX_OF_KEY[key[:2]]]
        channels = tensors["to_k_face.weight"].shape[0]
        q, k, v = (torch.randn(2, n, channels, generator=gen).to(torch.bfloat16) for n in (4, 77, 77))
        options = {"n_heads": 8, "cond_or_uncond": [1, 0], "sigmas": torch.tensor([1.0]),
                   "original_shape": [2, 4, 2, 2], "attn_precision": None}
        out = patch.to(torch.bfloat16)(q, k, v, options)
        assert out.dtype == torch.bfloat16
        call = {"q": q, "k": k, "v": v, "heads": 8, "cond_or_uncond": [1, 0]}
        face = face_branch(call, tensors, embeds.face_tokens[:1], embeds.uncond_tokens)
        assert rel_err(out.float() - text_branch(call), face) <= FACE_TOL[torch.bfloat16], key


@pytest.mark.parametrize("compute", [None, "bf16"], ids=["bf16-weights", "bf16-compute"])
def test_bf16_sampling_keeps_lora_and_face_branch(comfy, bed, compute):
    unet, ida, embeds, layers, base = bed
    model = unet if compute is None else comfy.nodes.NODE_CLASS_MAPPINGS["ModelComputeDtype"]().patch(unet, compute)[0]
    calls, captured = [], []
    sample(comfy, capturing_weights(recording(apply(comfy, model, ida, embeds), calls), MODEL_NAMES, captured),
           frames=2, steps=1)
    deltas = lora_deltas(layers)
    for name in MODEL_NAMES:
        live = captured[0][name]
        assert live.dtype == torch.bfloat16, name
        w = base[name].to(torch.bfloat16).float()
        # ComfyUI merges in fp32 and rounds (stochastically) into bf16: within one bf16 step
        torch.testing.assert_close(live.float(), w + deltas[name], rtol=2 ** -7, atol=1e-30, msg=name)
        assert (live.float() - w).abs().max() > 1e-3, name
    # bf16 weights alone: ComfyUI casts them to its compute dtype for the device (fp32 on CPU)
    compute_dtype = torch.bfloat16 if compute == "bf16" else (unet.model.manual_cast_dtype or torch.bfloat16)
    assert len(calls) == 16
    for call in calls:
        assert call["q"].dtype == call["out"].dtype == compute_dtype, call["key"]
        text = text_branch(call)
        face = face_branch(call, layers[INDEX_OF_KEY[call["key"][:2]]], embeds.face_tokens[:1], embeds.uncond_tokens)
        assert rel_err(call["out"].float() - text, face) <= FACE_TOL[compute_dtype], call["key"]
