"""FaceEncode runs the CLIP ViT-H/14 tower once per photo (issue 19, item 6): the unconditional
tokens are computed by the first encode of a loaded adapter and kept on its ID_ANIMATOR, and two
LoadIDAnimator nodes naming the same CLIP file hold one tower. Counted on the real tower with a
forward hook, through the real executor; the kept tokens equal, bit for bit, the per-encode
computation they replace."""
from __future__ import annotations

import sys

import torch

from support.graphs import id_nodes


def cached_output(comfy, node_id: str, index: int = 0):
    return comfy.loop.run_until_complete(comfy.executor.caches.outputs.get(node_id)).outputs[index][0]


def test_uncond_tokens_once_per_adapter_and_one_tower_per_file(comfy):
    first = comfy.run(id_nodes("astronaut.png"))
    assert first.success, first.error_message
    ida = cached_output(comfy, "ida")

    forwards: list[bool] = []  # one entry per tower forward: was the input the all-zero image?
    hook = ida.clip_vision.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(bool((kwargs["pixel_values"] == 0).all())), with_kwargs=True)
    try:
        # the same loader with a new photo, and a second loader (another provider) naming the same CLIP file
        graph = id_nodes("newton.png")
        second_loader = id_nodes("solvay_1927.jpg", prefix="b_")
        second_loader["b_ida"]["inputs"]["provider"] = "auto"
        second_loader["b_encode"]["inputs"]["face_select"] = "largest"
        graph.update(second_loader)
        second = comfy.run(graph)
    finally:
        hook.remove()
    assert second.success, second.error_message
    cached = next(d["nodes"] for e, d in second.messages if e == "execution_cached")
    assert "ida" in cached and "b_ida" not in cached, cached

    ida_b = cached_output(comfy, "b_ida")
    assert ida_b is not ida and ida_b.clip_vision is ida.clip_vision, "one tower for one CLIP file"
    # two photos, one uncond pass for the new loader; none for the loader that encoded before
    # (per-encode uncond tokens would make this [False, True, False, True])
    assert sorted(forwards) == [False, False, True], forwards

    encode = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"].__module__]
    per_encode = encode.uncond_tokens(lambda px: encode.clip_penultimate(ida.clip_vision, px),
                                         lambda h: encode.resample(ida, h), device="cpu").float().cpu()
    newton, solvay = cached_output(comfy, "encode"), cached_output(comfy, "b_encode")
    assert newton.uncond_tokens is ida.uncond.value  # kept, not recomputed
    assert torch.equal(newton.uncond_tokens, per_encode)
    assert torch.equal(solvay.uncond_tokens, per_encode)  # same tower, same adapter file
    assert not torch.equal(newton.face_tokens, solvay.face_tokens)
