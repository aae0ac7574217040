"""The table of bad model files (tests/support/bad_files.py) through the real LoadIDAnimator node
in ComfyUI and through the trainer: each file gets the same message in both (issue 19 item 1).

Adapter: the node vs `train export FILE` (train/export.read_adapter). CLIP vision: the node vs
`train/sd15.load_image_encoder`, the trainer's image encoder loader.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from id_animator.adapter.errors import CheckpointError
from support.bad_files import BAD_FILES, write_bad_file
from support.graphs import id_nodes

pytestmark = pytest.mark.integration

# every file fault, and the wrong models a user may drop in that folder (each CLIP case first
# loads the real-size adapter, so the CLIP list keeps one entry per kind of fault)
ADAPTER_CASES = list(BAD_FILES)
CLIP_CASES = ["Git LFS pointer", "truncated safetensors", "pickle with code", "ViT-L", "SDXL checkpoint",
              "UniAnimate UNet"]


def node_error(comfy, comfy_base: Path, folder: str, field: str, name: str, prefix: str) -> tuple[Path, str]:
    path = write_bad_file(comfy_base / "models" / folder, name)
    comfy.folder_paths.filename_list_cache.clear()
    graph = id_nodes(prefix=prefix)
    graph[f"{prefix}ida"]["inputs"][field] = path.name
    result = comfy.run(graph)
    assert not result.success and result.error, result.outputs
    assert result.error.get("node_id") == f"{prefix}ida", result.error
    assert result.error.get("exception_type", "").endswith("CheckpointError"), result.error
    return path, result.error_message.removesuffix("\n")  # ComfyUI ends the message with a newline


def trainer_error(call, path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        call(path)
    return str(info.value)


@pytest.mark.parametrize("name", ADAPTER_CASES)
def test_a_bad_adapter_file_says_the_same_in_the_node_and_the_trainer(comfy, comfy_base, name):
    from id_animator.train.export import read_adapter

    path, message = node_error(comfy, comfy_base, "id_animator", "adapter_name", name,
                               f"badada{ADAPTER_CASES.index(name)}_")
    assert message == trainer_error(read_adapter, path)
    for word in BAD_FILES[name][2]:
        assert word in message, (word, message)


@pytest.mark.parametrize("name", CLIP_CASES)
def test_a_bad_clip_vision_file_says_the_same_in_the_node_and_the_trainer(comfy, comfy_base, name):
    pytest.importorskip("transformers")
    from id_animator.train.sd15 import load_image_encoder

    path, message = node_error(comfy, comfy_base, "clip_vision", "clip_vision_name", name,
                               f"badclip{CLIP_CASES.index(name)}_")
    assert message == trainer_error(load_image_encoder, path)
    for word in BAD_FILES[name][2]:
        assert word in message, (word, message)
