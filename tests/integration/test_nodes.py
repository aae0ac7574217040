"""The node contract and behaviour in real ComfyUI graphs (issue 4)."""
from __future__ import annotations

import pytest
import torch

from support.graphs import (ADAPTER, CLIP_VISION, DETECTOR, apply_node, face_video_graph, id_nodes,
                            sampling_graph, saved_latent)

CONTRACT = {
    "LoadIDAnimator": {
        "required": {"adapter_name": ("COMBO", {}), "clip_vision_name": ("COMBO", {}),
                     "face_detector": ("COMBO", {}),
                     "provider": ("COMBO", {"default": "auto", "options": ["auto", "CPU", "CUDA", "ROCM", "CoreML"]})},
        "optional": {}, "output": ["ID_ANIMATOR"]},
    "FaceEncode": {
        "required": {"id_animator": ("ID_ANIMATOR", {}), "image": ("IMAGE", {}),
                     "face_select": ("COMBO", {"default": "most confident",
                                               "options": ["most confident", "largest", "index"]}),
                     "face_index": ("INT", {"default": 0}),
                     "on_no_face": ("COMBO", {"default": "error", "options": ["error", "skip image"]})},
        "optional": {}, "output": ["FACE_EMBEDS", "IMAGE"], "output_name": ["face_embeds", "face_crops"]},
    "IDMix": {
        "required": {"embeds_a": ("FACE_EMBEDS", {}), "embeds_b": ("FACE_EMBEDS", {}),
                     "blend": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "display": "slider"}),
                     "blend_end": ("FLOAT", {"default": -1.0, "advanced": True})},
        "optional": {}, "output": ["FACE_EMBEDS"], "output_name": ["face_embeds"]},
    "ApplyFaceAdapter": {
        "required": {"model": ("MODEL", {}), "id_animator": ("ID_ANIMATOR", {}), "face_embeds": ("FACE_EMBEDS", {}),
                     "weight": ("FLOAT", {"default": 0.8, "min": 0.0, "max": 2.0}),
                     "start_at": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0}),
                     "end_at": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0}),
                     "lora_strength": ("FLOAT", {"default": 1.0, "advanced": True})},
        "optional": {"attn_mask": ("MASK", {})}, "output": ["MODEL"], "output_name": ["model"]},
}


def test_object_info_shows_exactly_the_contract(http_comfy):
    info = http_comfy.get("/object_info")
    for node_id, contract in CONTRACT.items():
        node = info[node_id]
        for section in ("required", "optional"):
            got = node["input"].get(section, {})
            assert list(got) == list(contract[section]), (node_id, section, list(got))
            for name, (kind, options) in contract[section].items():
                assert got[name][0] == kind, (node_id, name, got[name][0])
                assert got[name][1].get("tooltip"), f"{node_id}.{name} has no tooltip"
                for key, value in options.items():
                    assert got[name][1].get(key) == value, (node_id, name, key, got[name][1].get(key))
        assert node["output"] == contract["output"]
        if "output_name" in contract:
            assert node["output_name"] == contract["output_name"]
        assert node["category"] == "id_animator" and node["description"]
    assert "animator.ckpt" in info["LoadIDAnimator"]["input"]["required"]["adapter_name"][1]["options"]
    assert DETECTOR in info["LoadIDAnimator"]["input"]["required"]["face_detector"][1]["options"]


def latent_of(comfy, comfy_base, graph, node="save"):
    result = comfy.run(graph)
    assert result.success, result.error_message
    return saved_latent(comfy_base / "output", result.outputs[node])


def test_face_branch_only_inside_start_end(comfy, comfy_base):
    """One step at the top of the schedule: with start_at after it, the step is the unpatched one."""
    def one_step(start_at, prefix):
        graph = face_video_graph(frames=2, weight=1.0, lora_strength=0.0, start_at=start_at, prefix=prefix)
        graph["sampler"]["inputs"]["steps"] = 1
        return latent_of(comfy, comfy_base, graph)

    plain_graph = sampling_graph(frames=2, prefix="se_plain")
    plain_graph["sampler"]["inputs"]["steps"] = 1
    plain = latent_of(comfy, comfy_base, plain_graph)
    assert torch.equal(one_step(0.5, "se_late"), plain)
    assert not torch.allclose(one_step(0.0, "se_on"), plain)


def test_lora_alone_changes_the_output(comfy, comfy_base):
    plain = latent_of(comfy, comfy_base, sampling_graph(frames=2, prefix="lora_plain"))
    lora_only = latent_of(comfy, comfy_base, face_video_graph(frames=2, weight=0.0, lora_strength=1.0,
                                                              prefix="lora_only"))
    assert not torch.allclose(lora_only, plain)


def two_identity_graph() -> dict:
    """Samples the original UNet, ApplyFaceAdapter(A) and ApplyFaceAdapter(A) -> ApplyFaceAdapter(B)
    in ONE graph, so shared state between the three models would show."""
    graph = sampling_graph(frames=2, prefix="two_plain")
    graph.update(id_nodes())
    graph.update(id_nodes("solvay_1927.jpg", prefix="b_"))
    graph["b_encode"]["inputs"]["face_select"] = "largest"
    graph["apply_a"] = apply_node(["unet", 0], ["encode", 0], ["ida", 0], weight=0.8)
    graph["apply_b"] = apply_node(["apply_a", 0], ["b_encode", 0], ["ida", 0], weight=0.8)
    for name, model in (("a", "apply_a"), ("ab", "apply_b")):
        graph[f"sampler_{name}"] = {**graph["sampler"], "inputs": {**graph["sampler"]["inputs"], "model": [model, 0]}}
        graph[f"save_{name}"] = {"class_type": "SaveLatent",
                                 "inputs": {"samples": [f"sampler_{name}", 0], "filename_prefix": f"two_{name}"}}
    return graph


def test_original_model_and_chained_adapters_are_independent(comfy, comfy_base):
    result = comfy.run(two_identity_graph())
    assert result.success, result.error_message
    out = comfy_base / "output"
    plain, only_a, a_then_b = (saved_latent(out, result.outputs[n]) for n in ("save", "save_a", "save_ab"))
    alone_plain = latent_of(comfy, comfy_base, sampling_graph(frames=2, prefix="two_alone_plain"))
    alone_a = face_video_graph(frames=2, prefix="two_alone_a")
    assert torch.equal(plain, alone_plain)  # the upstream MODEL was never mutated
    assert torch.equal(only_a, latent_of(comfy, comfy_base, alone_a))  # B did not leak into A's model
    assert not torch.allclose(a_then_b, only_a)  # B contributes on top of A
    assert not torch.allclose(only_a, plain)


def test_community_checkpoint_through_checkpoint_loader_simple(comfy, comfy_base):
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random_full.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "portrait photo"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        **id_nodes(),
        "apply": apply_node(["ckpt", 0], ["encode", 0], ["ida", 0]),
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 1, "steps": 2, "cfg": 2.0, "sampler_name": "ddim", "scheduler": "ddim_uniform", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "ckpt_face"}},
    }
    result = comfy.run(graph)
    assert result.success, result.error_message
    images = result.outputs["save"]["images"]
    assert len(images) == 2 and all((comfy_base / "output" / i["filename"]).exists() for i in images)


def test_face_encode_preview_and_crops(comfy, comfy_base):
    # A photo no other test uses: a cached FaceEncode would not resend its preview.
    import shutil

    shutil.copy(comfy_base / "input" / "astronaut.png", comfy_base / "input" / "astronaut_preview.png")
    result = comfy.run(id_nodes("astronaut_preview.png", prefix="pv_"))
    assert result.success, result.error_message
    assert result.outputs["pv_encode"]["images"], "FaceEncode shows its aligned crops in the node"
    assert result.outputs["pv_crops"]["images"]


def test_loaders_are_cached_between_runs(comfy):
    graph = id_nodes(prefix="cache_")
    first = comfy.run(graph)
    second = comfy.run(graph)
    assert first.success and second.success
    cached = next(d["nodes"] for e, d in second.messages if e == "execution_cached")
    assert {"cache_ida", "cache_photo", "cache_encode"} <= set(cached)


# --- errors, triggered for real, shown in ComfyUI's execution error ---------------------------

def error_of(comfy, graph) -> str:
    result = comfy.run(graph)
    assert not result.success
    return f"{result.error}\n{result.node_errors}"


def test_error_non_sd15_model(comfy):
    graph = face_video_graph(frames=2, prefix="err_sd2")
    graph["unet"]["inputs"]["unet_name"] = "sd2_random_unet.safetensors"
    message = error_of(comfy, graph)
    assert "SD1.5" in message and "768" in message


def test_error_clip_vision_not_vit_h(comfy):
    graph = id_nodes()
    graph["ida"]["inputs"]["clip_vision_name"] = "CLIP-ViT-L-14-random.safetensors"
    message = error_of(comfy, graph)
    assert "ViT-L/14" in message and "ViT-H/14" in message


def test_error_no_face(comfy):
    message = error_of(comfy, id_nodes("rocket.png"))
    assert "no face" in message and "image(s) 0" in message and "skip image" in message


def test_skip_image_still_errors_when_no_photo_has_a_face(comfy):
    graph = id_nodes("rocket.png")
    graph["encode"]["inputs"]["on_no_face"] = "skip image"
    assert "no face" in error_of(comfy, graph)


@pytest.mark.parametrize("field,value,words", [
    ("adapter_name", "missing_animator.ckpt", ["missing_animator.ckpt", "id_animator", "huggingface"]),
    ("clip_vision_name", "missing_vit.safetensors", ["missing_vit.safetensors", "clip_vision", "ViT-H"]),
    ("face_detector", "buffalo_l", ["buffalo_l", "insightface"]),
])
def test_error_missing_model_file(comfy, field, value, words):
    graph = id_nodes()
    graph["ida"]["inputs"][field] = value
    message = error_of(comfy, graph)
    for word in words:
        assert word in message, (word, message)


def test_error_wrong_adapter_file(comfy, comfy_base):
    """An IP-Adapter file dropped into models/id_animator/ is named as such."""
    from safetensors.torch import save_file

    path = comfy_base / "models" / "id_animator" / "ip-adapter-plus_sd15.safetensors"
    save_file({"image_proj.latents": torch.zeros(1, 16, 768),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
               "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768)}, str(path))
    comfy.folder_paths.filename_list_cache.clear()
    graph = id_nodes()
    graph["ida"]["inputs"]["adapter_name"] = path.name
    message = error_of(comfy, graph)
    assert "IP-Adapter" in message and "animator.ckpt" in message


def test_extra_model_paths_yaml_remaps_the_adapter_folder(comfy, comfy_base, model_files, tmp_path,
                                                          monkeypatch):
    """Users keep models elsewhere: ComfyUI's own extra_model_paths loader adds our folder key."""
    import utils.extra_config

    # The folder goes when tmp_path does, and ComfyUI's file-list cache stats every folder it
    # lists, so the later tests of this process must not see it: undo the registration after.
    paths, extensions = comfy.folder_paths.folder_names_and_paths["id_animator"]
    monkeypatch.setitem(comfy.folder_paths.folder_names_and_paths, "id_animator", (list(paths), extensions))
    monkeypatch.setattr(comfy.folder_paths, "filename_list_cache", {})
    elsewhere = tmp_path / "shared_models" / "faces"
    elsewhere.mkdir(parents=True)
    (elsewhere / "animator_remapped.ckpt").symlink_to(model_files["id_animator"]["animator.ckpt"])
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"shared:\n    base_path: {tmp_path / 'shared_models'}\n    id_animator: faces\n")
    utils.extra_config.load_extra_path_config(str(config))
    assert "animator_remapped.ckpt" in comfy.folder_paths.get_filename_list("id_animator")
    graph = id_nodes(prefix="remap_")
    graph["remap_ida"]["inputs"]["adapter_name"] = "animator_remapped.ckpt"
    result = comfy.run(graph)
    assert result.success, result.error_message
