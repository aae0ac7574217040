"""Several adapters side by side in one graph: FACE_EMBEDS remember which adapter made them, and
IDMix and ApplyFaceAdapter refuse another adapter's embeds with a message naming both; the same
adapter loaded twice (the same file, or its fp16 .safetensors copy under another name) works.

Adapter B is a second random adapter and the fp16 copy a conversion of the test bed's
animator.ckpt, both written into the base's models/id_animator/ for this module only."""
from __future__ import annotations

import pytest
import torch

from id_animator.adapter.checkpoint import (
    load_adapter_checkpoint, random_adapter_weights, save_adapter_safetensors)
from id_animator.adapter.identity import SHORT_FINGERPRINT, adapter_fingerprint
from support.graphs import ADAPTER, apply_node, id_mix_graph, id_nodes, sampling_graph, saved_latent

OTHER = "ida_test_other_adapter.safetensors"  # adapter B: different weights
COPY = "ida_test_animator_fp16.safetensors"  # animator.ckpt converted to fp16: the same adapter


@pytest.fixture(scope="module")
def adapters(comfy, comfy_base) -> dict[str, str]:
    """File name -> short fingerprint, for A (animator.ckpt), its fp16 copy and B."""
    folder = comfy_base / "models" / "id_animator"
    weights = load_adapter_checkpoint(folder / ADAPTER)
    fingerprints = {ADAPTER: adapter_fingerprint(weights)}
    save_adapter_safetensors(weights.to(torch.float16), folder / COPY)
    del weights
    fingerprints[COPY] = adapter_fingerprint(load_adapter_checkpoint(folder / COPY))  # as read back
    other = random_adapter_weights(seed=1)
    fingerprints[OTHER] = adapter_fingerprint(other)
    save_adapter_safetensors(other, folder / OTHER)
    del other
    comfy.folder_paths.filename_list_cache.clear()
    yield {name: fingerprint[:SHORT_FINGERPRINT] for name, fingerprint in fingerprints.items()}
    for name in (OTHER, COPY):
        (folder / name).unlink(missing_ok=True)
    comfy.folder_paths.filename_list_cache.clear()


def second_loader(graph: dict, adapter_name: str) -> dict:
    """A LoadIDAnimator `b_ida` on another file, beside the graph's `ida`."""
    graph["b_ida"] = {**graph["ida"], "inputs": {**graph["ida"]["inputs"], "adapter_name": adapter_name}}
    return graph


def person_b(graph: dict, ida: str) -> dict:
    """The largest Solvay face, encoded with the LoadIDAnimator `ida`, as `b_encode`."""
    nodes = id_nodes("solvay_1927.jpg", prefix="b_")
    del nodes["b_ida"]
    nodes["b_encode"]["inputs"].update(id_animator=[ida, 0], face_select="largest")
    graph.update(nodes)
    return graph


def assert_refused(comfy, graph: dict, node: str, words: list[str]) -> str:
    result = comfy.run(graph)
    assert not result.success, f"{node} accepted another adapter's embeds"
    assert result.error["node_id"] == node, result.error
    message = result.error_message
    for word in words:
        assert word in message, (word, message)
    return message


def test_apply_face_adapter_refuses_embeds_of_another_adapter(comfy, adapters):
    graph = sampling_graph(frames=2, steps=1, model=["apply", 0], prefix="ida_wrong_apply")
    graph.update(id_nodes())  # astronaut encoded with A
    second_loader(graph, OTHER)
    graph["apply"] = apply_node(["unet", 0], ["encode", 0], ["b_ida", 0])  # ... applied with B
    message = assert_refused(comfy, graph, "apply", [
        ADAPTER, adapters[ADAPTER], OTHER, adapters[OTHER], "same Load ID-Animator"])
    assert message.index(adapters[ADAPTER]) < message.index(adapters[OTHER])  # the embeds' adapter first


def test_id_mix_refuses_embeds_of_two_adapters(comfy, adapters):
    graph = sampling_graph(frames=2, steps=1, model=["apply", 0], prefix="ida_wrong_mix")
    graph.update(id_nodes())  # astronaut with A
    second_loader(graph, OTHER)
    person_b(graph, "b_ida")  # Solvay with B
    graph["mix"] = {"class_type": "IDMix", "inputs": {
        "embeds_a": ["encode", 0], "embeds_b": ["b_encode", 0], "blend": 0.5, "blend_end": -1.0}}
    graph["apply"] = apply_node(["unet", 0], ["mix", 0], ["ida", 0])
    assert_refused(comfy, graph, "mix", [
        ADAPTER, adapters[ADAPTER], OTHER, adapters[OTHER], "same Load ID-Animator"])


def test_same_adapter_loaded_twice_works(comfy, comfy_base, adapters):
    """Two LoadIDAnimator nodes on animator.ckpt give exactly the one-loader video; the fp16 copy
    under another name is the same adapter too: mixed with A's embeds and applied, it samples."""
    assert adapters[COPY] == adapters[ADAPTER] != adapters[OTHER]
    out = comfy_base / "output"
    one = comfy.run(id_mix_graph(0.3, -1.0, prefix="ida_one_loader"))
    assert one.success, one.error_message

    twice = id_mix_graph(0.3, -1.0, prefix="ida_two_loaders")
    second_loader(twice, ADAPTER)
    twice["b_encode"]["inputs"]["id_animator"] = ["b_ida", 0]
    twice["apply"]["inputs"]["id_animator"] = ["b_ida", 0]
    result = comfy.run(twice)
    assert result.success, result.error_message
    assert torch.equal(saved_latent(out, result.outputs["save"]), saved_latent(out, one.outputs["save"]))

    copy = id_mix_graph(0.3, -1.0, prefix="ida_fp16_copy")
    second_loader(copy, COPY)
    copy["b_encode"]["inputs"]["id_animator"] = ["b_ida", 0]
    copy["apply"] = apply_node(["unet", 0], ["mix", 0], ["b_ida", 0], weight=1.0, lora_strength=1.0)
    result = comfy.run(copy)
    assert result.success, result.error_message
    latent = saved_latent(out, result.outputs["save"])
    assert torch.isfinite(latent).all()
    assert not torch.equal(latent, saved_latent(out, one.outputs["save"]))  # the copy's LoRA is merged
