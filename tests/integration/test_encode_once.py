"""FaceEncode runs the CLIP ViT-H/14 tower once per photo (issue 19, item 6): the unconditional
tokens are computed by the first encode with a CLIP file and an adapter file and then kept for
those two files, so a second loader of the same files (or the same loader run again after ComfyUI
dropped it) computes none; and two LoadIDAnimator nodes naming the same CLIP file hold one tower.
Counted on every call of FaceEncode's tower function (`clip_penultimate`, its only way to the
tower) through the real executor; the kept tokens equal, bit for bit, the per-encode computation
they replace."""
from __future__ import annotations

import os
import sys
from collections import OrderedDict

import torch

from support.graphs import id_nodes


def cached_output(comfy, node_id: str, index: int = 0):
    return comfy.loop.run_until_complete(comfy.executor.caches.outputs.get(node_id)).outputs[index][0]


def test_uncond_tokens_once_per_pair_of_files_and_one_tower_per_file(comfy, monkeypatch):
    encode = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"].__module__]
    shared = sys.modules[encode.__package__ + ".shared_models"]
    monkeypatch.setattr(shared, "_RESULTS", OrderedDict())  # nothing kept yet, as in a fresh process
    forwards: list[bool] = []  # one entry per tower call: was the input the all-zero image?
    tower = encode.clip_penultimate

    def counted(clip_vision, pixels):
        forwards.append(bool((pixels == 0).all()))
        return tower(clip_vision, pixels)

    monkeypatch.setattr(encode, "clip_penultimate", counted)
    first = comfy.run(id_nodes("astronaut.png"))
    assert first.success, first.error_message
    assert forwards == [False, True], "the first encode: its photo, then the unconditional tokens once"
    ida = cached_output(comfy, "ida")

    # the same loader with a new photo, and a second loader (another provider) naming the same files
    forwards.clear()
    graph = id_nodes("newton.png")
    second_loader = id_nodes("solvay_1927.jpg", prefix="b_")
    second_loader["b_ida"]["inputs"]["provider"] = "auto"
    second_loader["b_encode"]["inputs"]["face_select"] = "largest"
    graph.update(second_loader)
    second = comfy.run(graph)
    assert second.success, second.error_message
    cached = next(d["nodes"] for e, d in second.messages if e == "execution_cached")
    assert "ida" in cached and "b_ida" not in cached, cached

    ida_b = cached_output(comfy, "b_ida")
    assert ida_b is not ida and ida_b.clip_vision is ida.clip_vision, "one tower for one CLIP file"
    # two photos and no unconditional pass: the new loader names files encoded before
    # (per-encode tokens would make this [False, True, False, True], per-loader ones add a True)
    assert forwards == [False, False], forwards
    assert ida_b.uncond is ida.uncond

    per_encode = encode.uncond_tokens(lambda px: tower(ida.clip_vision, px),
                                      lambda h: encode.resample(ida, h), device="cpu").float().cpu()
    newton, solvay = cached_output(comfy, "encode"), cached_output(comfy, "b_encode")
    assert newton.uncond_tokens is ida.uncond.value  # kept, not recomputed
    assert torch.equal(newton.uncond_tokens, per_encode)
    assert torch.equal(solvay.uncond_tokens, per_encode)  # same tower, same adapter file
    assert not torch.equal(newton.face_tokens, solvay.face_tokens)


def test_kept_results_follow_the_file_versions(comfy, tmp_path, monkeypatch):
    """Another file, or the same name rewritten, gets a slot of its own; the oldest slots go."""
    encode = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"].__module__]
    shared = sys.modules[encode.__package__ + ".shared_models"]
    monkeypatch.setattr(shared, "_RESULTS", OrderedDict())
    clip, adapter, other = (tmp_path / name for name in ("clip.safetensors", "a.ckpt", "b.ckpt"))
    for path in (clip, adapter, other):
        path.write_bytes(b"x")
    slot = shared.result_of_files("uncond_tokens", str(clip), str(adapter))
    assert shared.result_of_files("uncond_tokens", str(clip), str(adapter)) is slot
    assert shared.result_of_files("uncond_tokens", str(clip), str(other)) is not slot
    adapter.write_bytes(b"xy")  # replaced under the same name: a new adapter
    os.utime(adapter, ns=(1, 1))
    assert shared.result_of_files("uncond_tokens", str(clip), str(adapter)) is not slot
    oldest = shared.result_of_files("uncond_tokens", str(clip), str(other))
    for i in range(shared.KEPT_RESULTS):
        newer = tmp_path / f"adapter_{i}.ckpt"
        newer.write_bytes(b"x")
        shared.result_of_files("uncond_tokens", str(clip), str(newer))
    assert len(shared._RESULTS) == shared.KEPT_RESULTS
    assert shared.result_of_files("uncond_tokens", str(clip), str(other)) is not oldest, "the oldest slot goes"
