"""UniAnimate's image condition: the official path equals UniAnimateConditioning's at fp32.

Official (ali-vilab/UniAnimate at 643c963, imported from the checkout): `utils/transforms.py`
Resize to `vit_resolution` [224, 224] (configs/UniAnimate_infer.yaml: a stretched bilinear resize,
no crop), torchvision ToTensor and Normalize with `vit_mean`/`vit_std` of tools/modules/config.py,
then open_clip's ViT-H-14 `visual` (what tools/modules/clip_embedder.py `encode_image` calls), from
the real open_clip package at the official pin. Ours: `clip_image_embeds`, ComfyUI's CLIP vision
model on the pack's resize.

Weights: the test bed's ViT-H/14 file, in the layout of CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors
(what users put in models/clip_vision/), mapped onto open_clip's layout, the layout the official
open_clip_pytorch_model.bin is stored in (the same laion2B model). The photo is stretched to
several non-square sizes first, so the resize is exercised."""
from __future__ import annotations

import importlib
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from support.photos import astronaut_image
from support.checkout_import import load_file, visible_while_importing
from support.unianimate_official import official_checkout


class AsFloat32(torch.nn.Module):
    """A parameter read as fp32 where it is used: the maths of an fp32 copy of the tower (what the
    official code holds) without keeping a second 2.5 GB tower beside the bed's."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.float()


def open_clip_visual(hf_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """open_clip's ViT-H-14 vision tower holding the HF-layout weights (the inverse of the
    open_clip → transformers conversion the laion2B release went through), computing in fp32."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.model import _build_vision_tower
    from torch.nn.utils import parametrize

    config = open_clip.get_model_config("ViT-H-14")
    with torch.device("meta"):
        visual = _build_vision_tower(config["embed_dim"], config["vision_cfg"])
    hf = {k.removeprefix("vision_model."): v for k, v in hf_state.items()}
    state = {
        "class_embedding": hf["embeddings.class_embedding"],
        "positional_embedding": hf["embeddings.position_embedding.weight"],
        "conv1.weight": hf["embeddings.patch_embedding.weight"],
        "ln_pre.weight": hf["pre_layrnorm.weight"], "ln_pre.bias": hf["pre_layrnorm.bias"],
        "ln_post.weight": hf["post_layernorm.weight"], "ln_post.bias": hf["post_layernorm.bias"],
        "proj": hf["visual_projection.weight"].t(),
    }
    for i in range(config["vision_cfg"]["layers"]):
        ours, theirs = f"transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for part in ("weight", "bias"):
            state[f"{ours}attn.in_proj_{part}"] = torch.cat(
                [hf[f"{theirs}self_attn.{p}_proj.{part}"] for p in "qkv"])
            state[f"{ours}attn.out_proj.{part}"] = hf[f"{theirs}self_attn.out_proj.{part}"]
            state[f"{ours}ln_1.{part}"] = hf[f"{theirs}layer_norm1.{part}"]
            state[f"{ours}ln_2.{part}"] = hf[f"{theirs}layer_norm2.{part}"]
            state[f"{ours}mlp.c_fc.{part}"] = hf[f"{theirs}mlp.fc1.{part}"]
            state[f"{ours}mlp.c_proj.{part}"] = hf[f"{theirs}mlp.fc2.{part}"]
    visual.load_state_dict(state, strict=True, assign=True)
    for module in list(visual.modules()):
        for name, _ in list(module.named_parameters(recurse=False)):
            parametrize.register_parametrization(module, name, AsFloat32(), unsafe=True)
    return visual.eval()


def official_vit_transforms(cache) -> object:
    """configs/UniAnimate_infer.yaml's vit_transforms, built from the checkout's own modules (only
    `easydict`, which tools/modules/config.py imports, is stubbed: a dict with attribute access)."""
    import torchvision.transforms as T

    root = official_checkout(cache)
    easydict = types.ModuleType("easydict")
    easydict.EasyDict = type("EasyDict", (dict,), {"__getattr__": dict.__getitem__, "__setattr__": dict.__setitem__})
    with visible_while_importing(("unianimate_official_transforms", "unianimate_official_config"),
                                 {"easydict": easydict}):
        transforms = load_file("unianimate_official_transforms", root / "utils" / "transforms.py")
        config = load_file("unianimate_official_config", root / "tools" / "modules" / "config.py").cfg
    return T.Compose([transforms.Resize([224, 224]), T.ToTensor(), T.Normalize(mean=config.vit_mean, std=config.vit_std)])


@pytest.fixture(scope="module")
def official(identity_bed, cache_dir):
    """(open_clip's tower on the bed's ViT-H weights, the official transforms), built once."""
    return open_clip_visual(identity_bed.ida.clip_vision.model.state_dict()), official_vit_transforms(cache_dir)


@pytest.mark.parametrize("size", [(300, 200), (177, 311), (512, 512)])
def test_image_embedding_equals_the_official_open_clip(comfy, identity_bed, official, size):
    clip_vision = identity_bed.ida.clip_vision
    visual, transforms = official
    photo = Image.fromarray(astronaut_image()).resize(size, Image.BICUBIC)

    with torch.no_grad():
        expected = visual(transforms(photo)[None])  # [1, 1024]
    pack = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["UniAnimateConditioning"].__module__.rsplit(".nodes.", 1)[0]]
    conditioning = importlib.import_module(f"{pack.__name__}.nodes.unianimate_conditioning")
    image = torch.from_numpy(np.asarray(photo)).float()[None] / 255.0
    ours = conditioning.clip_image_embeds(clip_vision, image)

    assert ours.shape == (1, 1, 1024)
    assert ours.grad_fn is None  # no autograd graph of the tower kept alive (it leaked 3 GB a call)
    error = float((ours[:, 0] - expected).norm() / expected.norm())
    print(f"{size[0]}x{size[1]}: relative error {error:.2e}")
    assert error <= 1e-5
