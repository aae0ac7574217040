"""Inside real ComfyUI sampling runs, every patched attn2 layer computes exactly the adapter core's
maths: cond/uncond chunks in both orders, frames in the batch, context windows (core and
AnimateDiff-Evolved style) and identity morphs per global frame index. The attention mask has its
own test (test_attention_mask.py)."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

from support.mixing import mixed_tokens

REL_TOL = 1e-5


@pytest.fixture(scope="module")
def pack(comfy):
    """The pack as ComfyUI loaded it (its module name is the folder path)."""
    name = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"].__module__.rsplit(".nodes.", 1)[0]
    return sys.modules[name]


def sub(pack, module: str):
    return importlib.import_module(f"{pack.__name__}.{module}")


@pytest.fixture(scope="module")
def loaded(identity_bed):
    """Real loaders: the SD1.5 UNet, the adapter bundle, and two identities from real photos (the
    astronaut and the mirrored astronaut: the same person, another crop, different tokens)."""
    return identity_bed.unet, identity_bed.ida, identity_bed.embeds, identity_bed.embeds_mirrored


class Recorder:
    """Wraps a registered attn2 patch, keeping its inputs and output (never modifies it)."""

    def __init__(self, patch, key, calls):
        self.patch, self.key, self.calls = patch, key, calls

    def __call__(self, q, k, v, extra_options):
        out = self.patch(q, k, v, extra_options)
        window = extra_options.get("context_window")
        self.calls.append({
            "key": self.key, "q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone(),
            "cond_or_uncond": list(extra_options["cond_or_uncond"]), "heads": extra_options["n_heads"],
            "original_shape": list(extra_options["original_shape"]),
            "sub_idxs": (extra_options.get("ad_params") or {}).get("sub_idxs"),
            "index_list": None if window is None else list(window.index_list),
        })
        return out


def recording(model, calls):
    patched = model.clone()
    for key, patch in patched.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        patched.set_model_attn2_replace(Recorder(patch, key, calls), *key)
    return patched


def reverse_chunk_order(model):
    """Make the UNet see the batch as [cond, uncond] (ComfyUI builds [uncond, cond]), through
    ComfyUI's own model_function_wrapper: chunks, their text and `cond_or_uncond` are reversed
    on the way in and the output chunks restored on the way out."""

    def flip(t, chunks):
        return torch.cat(t.chunk(chunks)[::-1]) if torch.is_tensor(t) and t.shape[0] % chunks == 0 else t

    def wrapper(apply_model, args):
        chunks = len(args["cond_or_uncond"])
        c = {key: flip(value, chunks) for key, value in args["c"].items()}
        c["transformer_options"] = {**args["c"]["transformer_options"],
                                    "cond_or_uncond": list(args["cond_or_uncond"])[::-1]}
        out = apply_model(flip(args["input"], chunks), flip(args["timestep"], chunks), **c)
        return flip(out, chunks)

    model = model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    return model


def text_conditioning(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen), {}]]


def sample(comfy, model, frames: int, steps: int = 1, cfg: float = 2.0, size: int = 64):
    latent = {"samples": torch.zeros(frames, 4, size // 8, size // 8)}
    return comfy.nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", text_conditioning(1),
                                       text_conditioning(2), latent)[0]["samples"]


def expected_output(pack, call, ida, embeds, weight, total_frames, frame_indices):
    """The adapter core's maths for one recorded call, from scratch (tokens -> K/V -> attention)."""
    fa = sub(pack, "adapter.face_attention")
    layer = sub(pack, "adapter.layer_map").layer_by_patch_key(call["key"][:2])
    tensors = ida.weights.layers[layer.official_index]
    to_k, to_v = tensors["to_k_face.weight"].float(), tensors["to_v_face.weight"].float()
    frames = call["q"].shape[0] // len(call["cond_or_uncond"])
    cond_tokens = mixed_tokens(embeds, frame_indices, total_frames)  # (F,16,768)
    cond_k, cond_v = fa.project_face_tokens(cond_tokens, to_k, to_v)
    unc_k, unc_v = fa.project_face_tokens(embeds.uncond_tokens[None], to_k, to_v)
    keys = fa.batch_face_kv(cond_k, unc_k, call["cond_or_uncond"], frames)
    values = fa.batch_face_kv(cond_v, unc_v, call["cond_or_uncond"], frames)
    return fa.decoupled_attention(call["q"], call["k"], call["v"], keys, values, weight, call["heads"])


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def apply(comfy, model, ida, embeds, weight=0.8, lora_strength=1.0, start_at=0.0, end_at=1.0):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    return node.execute(model, ida, embeds, weight, start_at, end_at, lora_strength, None).args[0]


@pytest.mark.parametrize("reverse", [False, True], ids=["comfy-order", "reversed-order"])
def test_every_layer_matches_the_core_maths(comfy, pack, loaded, reverse):
    unet, ida, embeds, _ = loaded
    calls: list[dict] = []
    model = recording(apply(comfy, unet, ida, embeds, weight=0.8), calls)
    if reverse:
        model = reverse_chunk_order(model)
    sample(comfy, model, frames=4, steps=1)
    assert len(calls) == 16  # one step, one batch holding cond and uncond
    assert {tuple(c["key"][:2]) for c in calls} == {layer.patch_key for layer in sub(pack, "adapter.layer_map").LAYERS}
    assert calls[0]["cond_or_uncond"] == ([0, 1] if reverse else [1, 0])
    for call in calls:
        assert call["q"].shape[0] == 8  # 4 frames x 2 chunks
        expected = expected_output(pack, call, ida, embeds, 0.8, 4, list(range(4)))
        assert rel_err(call["out"], expected) <= REL_TOL, call["key"]


def test_reversed_order_gives_the_same_sampling_result(comfy, loaded):
    """The patch follows cond_or_uncond: flipping the batch order changes nothing downstream."""
    unet, ida, embeds, _ = loaded
    model = apply(comfy, unet, ida, embeds)
    normal = sample(comfy, model, frames=2, steps=1)
    flipped = sample(comfy, reverse_chunk_order(model), frames=2, steps=1)
    assert rel_err(flipped, normal) <= REL_TOL


def test_core_context_windows_give_each_frame_its_global_morph_tokens(comfy, pack, loaded):
    unet, ida, embeds_a, embeds_b = loaded
    morph = sub(pack, "adapter.identity").blend(embeds_a, embeds_b, 0.0, 1.0)
    windows = comfy.nodes.NODE_CLASS_MAPPINGS["ContextWindowsManual"]
    calls: list[dict] = []
    model = recording(apply(comfy, unet, ida, morph), calls)
    model = windows.execute(model, context_length=4, context_overlap=2, context_schedule="standard_static",
                            context_stride=1, closed_loop=False, fuse_method="pyramid", dim=0, freenoise=False,
                            causal_window_fix=False).args[0]
    sample(comfy, model, frames=6, steps=1)
    seen = {tuple(c["index_list"]) for c in calls}
    assert seen == {(0, 1, 2, 3), (2, 3, 4, 5)}, seen
    for call in calls:
        expected = expected_output(pack, call, ida, morph, 0.8, 6, call["index_list"])
        assert rel_err(call["out"], expected) <= REL_TOL, (call["key"], call["index_list"])
    # the morph is real: frame 0 and frame 5 use different identities
    assert not torch.allclose(mixed_tokens(morph, [0], 6), mixed_tokens(morph, [5], 6))


def test_animatediff_evolved_sub_idxs_pick_global_frames(comfy, pack, loaded):
    """AnimateDiff-Evolved slices a window and sets ad_params (simulated: it is not on PyPI)."""
    unet, ida, embeds_a, embeds_b = loaded
    morph = sub(pack, "adapter.identity").blend(embeds_a, embeds_b, 0.2, 0.9)
    calls: list[dict] = []
    model = recording(apply(comfy, unet, ida, morph), calls)
    model.model_options["transformer_options"]["ad_params"] = {
        "full_length": 10, "context_length": 4, "sub_idxs": [5, 6, 7, 8]}
    sample(comfy, model, frames=4, steps=1)
    assert calls and all(c["sub_idxs"] == [5, 6, 7, 8] for c in calls)
    for call in calls:
        expected = expected_output(pack, call, ida, morph, 0.8, 10, [5, 6, 7, 8])
        assert rel_err(call["out"], expected) <= REL_TOL, call["key"]
        wrong = expected_output(pack, call, ida, morph, 0.8, 4, [0, 1, 2, 3])
        assert rel_err(call["out"], wrong) > 1e-3  # local indices would be a different video
