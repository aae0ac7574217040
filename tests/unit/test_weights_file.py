"""adapter/weights_file.py: one reader, one identifier table, one key rule, one verified write,
shared by the node path (LoadIDAnimator's adapter loading) and the trainer path (train export)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from id_animator.adapter.checkpoint import (
    check_clip_vision_h, load_adapter_checkpoint, official_state_dict, random_adapter_weights,
)
from id_animator.adapter.errors import CheckpointError
from id_animator.adapter.weights_file import (
    KINDS, WeightsFile, canonical_key, identify, read_state_dict, write_verified,
)
from support.bad_files import BAD_FILES, write_bad_file

pytestmark = pytest.mark.unit


def error_of(call, *args) -> str:
    with pytest.raises(CheckpointError) as info:
        call(*args)
    return str(info.value)


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_file_gets_the_same_message_in_the_node_and_the_trainer(tmp_path: Path, name: str):
    """LoadIDAnimator reads the adapter with load_adapter_checkpoint; `train export FILE` with
    read_adapter: one message, which holds the table's words, the path and the expected file."""
    from id_animator.train.export import read_adapter

    path = write_bad_file(tmp_path, name)
    node = error_of(load_adapter_checkpoint, str(path))
    trainer = error_of(read_adapter, path)
    assert node == trainer
    for word in BAD_FILES[name][2]:
        assert word in node, (word, node)
    assert str(path) in node and "animator.ckpt" in node and "models/id_animator/" in node


@pytest.mark.parametrize("name", BAD_FILES)
def test_a_bad_clip_file_gets_one_message_from_the_reader_and_the_check(tmp_path: Path, name: str):
    """The node and sd15.load_image_encoder both read with the pack's reader and then ask
    check_clip_vision_h; here, the reader alone (WeightsFile, read_state_dict) agrees on faults."""
    path = write_bad_file(tmp_path, name)
    try:
        eager = read_state_dict(path)
    except CheckpointError as error:
        assert error_of(WeightsFile, path) == str(error)  # lazy and eager readers: one message
        return
    lazy = WeightsFile(path)
    message = error_of(check_clip_vision_h, path, eager)
    assert message == error_of(check_clip_vision_h, path, lazy.shapes)
    assert message.startswith(f"{path} is not the CLIP ViT-H/14 image encoder")
    for word in BAD_FILES[name][2]:
        assert word in message, (word, message)


@pytest.mark.parametrize("state, kind", [
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "sd15-checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "sd15-inpaint-checkpoint"),
    ({"cond_stage_model.model.transformer.resblocks.0.ln_1.weight": (1024,),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "sd2-checkpoint"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3), "label_emb.0.0.weight": (1280, 2816)}, "sdxl-unet"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3),
      "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}, "sd15-unet"),
    ({"visual.class_embedding": (1280,), "visual.transformer.resblocks.0.ln_1.weight": (1280,)}, "clip-vit-h"),
    ({"vision_model.embeddings.class_embedding": (768,)}, "clip-vision"),
    ({"image_proj.latents": (1, 16, 1280), "image_proj.proj_out.weight": (2048, 1280),
      "ip_adapter.1.to_k_ip.weight": (640, 2048)}, "ip-adapter-plus-sdxl"),
    ({"image_proj.proj.weight": (3072, 1024), "ip_adapter.1.to_k_ip.weight": (320, 768)}, "ip-adapter-sd15"),
    ({"module._orig_mod.image_proj_model.latents": (1, 16, 768)}, "id-animator"),
    ({"adapter_modules.69.to_k_face.weight": (1280, 2048)}, "id-animator-sdxl"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}, "lora"),
    ({"control_model.input_hint_block.0.weight": (16, 3, 3, 3)}, "controlnet"),
    ({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3), "decoder.up.0.block.0.conv1.weight": (128, 128, 3, 3)},
     "vae"),
    ({"text_model.embeddings.token_embedding.weight": (49408, 768)}, "text-encoder"),
    ({"something.else": (3,)}, None),
])
def test_identify_names_each_family(state, kind):
    assert identify(state) == kind
    assert kind is None or kind in KINDS


def test_identify_reads_nested_containers_and_tensors():
    tensors = {"state_dict": {"vision_model.embeddings.class_embedding": torch.zeros(1024)}}
    assert identify(tensors) == "clip-vit-l"


@pytest.mark.parametrize("key, canonical", [
    ("image_proj_model.latents", "image_proj_model.latents"),
    ("module.image_proj_model.latents", "image_proj_model.latents"),
    ("_orig_mod.adapter_modules.1.to_k_face.weight", "adapter_modules.1.to_k_face.weight"),
    ("module._orig_mod.module.adapter_modules.1.to_k_face.weight", "adapter_modules.1.to_k_face.weight"),
    ("modules.x", "modules.x"),
])
def test_one_key_rule_strips_ddp_and_compile_wrappers(key, canonical):
    assert canonical_key(key) == canonical


def test_a_torch_compiled_state_exports(tmp_path: Path):
    """A state saved from a torch.compile'd adapter (`_orig_mod.` keys, under DDP's `module.`)
    reads and exports: one key rule for reading and validating."""
    from id_animator.train.export import export_adapter, read_adapter

    weights = random_adapter_weights(seed=4, dtype=torch.float16)
    inner = official_state_dict(weights, "state_dict")["state_dict"]
    source = tmp_path / "compiled.safetensors"
    write_verified(source, {f"module._orig_mod.{k}": v for k, v in inner.items()})
    read, _ = read_adapter(source)
    result = export_adapter(read, tmp_path / "out")
    back = load_adapter_checkpoint(result.ckpt)
    assert all(torch.equal(back.resampler[k], t) for k, t in weights.resampler.items())
    assert all(torch.equal(back.layers[i][k], t) for i, layer in weights.layers.items() for k, t in layer.items())


@pytest.mark.parametrize("container", ["safetensors", "torch"])
def test_write_verified_round_trips_and_refuses_a_corrupted_write(tmp_path: Path, monkeypatch, container):
    state = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    path = tmp_path / ("w.safetensors" if container == "safetensors" else "w.ckpt")
    write_verified(path, state, container=container)
    back = read_state_dict(path)
    assert set(back) == set(state) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                           for k, v in state.items())
    old = path.read_bytes()

    import id_animator.adapter.weights_file as weights_file

    real = weights_file.read_state_dict

    def read_flipped(p):  # what a failing disk hands back
        got = real(p)
        got["a"] = got["a"].clone()
        got["a"][0, 0] += 1
        return got

    monkeypatch.setattr(weights_file, "read_state_dict", read_flipped)
    with pytest.raises(CheckpointError, match=r"1 tensors read back differ from those written \(a\)"):
        write_verified(path, {k: v * 2 for k, v in state.items()}, container=container)
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == [path.name]
