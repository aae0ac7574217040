"""A table of bad model files, written at run time: broken downloads and files of the wrong model.

Each entry writes one small file (keys and shapes of the real model; zeros as values) and names
the words its message must hold. The node path (LoadIDAnimator) and the trainer path (train
export, train/sd15 loaders) must give the same message for each (tests/unit/test_weights_file.py,
tests/integration/test_bad_files.py).
"""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch


def _safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    from safetensors.torch import save_file

    save_file({k: torch.zeros(s, dtype=torch.float16) for k, s in shapes.items()}, str(path))


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class _Print:  # pickles as a call of builtins.print: code a weights file must not carry
    def __reduce__(self):
        return (print, ("this pickle ran code",))


def _code_pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"state_dict": _Print()}, protocol=2))


def _truncated_zip(path: Path) -> None:
    torch.save({"state_dict": {"image_proj_model.latents": torch.zeros(1, 16, 768)}}, path)
    _cut(path, 0.6)
    assert not zipfile.is_zipfile(path)  # the index at the end is gone


def _truncated_safetensors(path: Path) -> None:
    _safetensors(path, {"vision_model.embeddings.class_embedding": (1280,),
                        "vision_model.post_layernorm.weight": (1280,)})
    _cut(path)


SDXL_UNET = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
             "conditioner.embedders.1.model.ln_final.weight": (1280,)}
SD2_UNET_ONLY = {"input_blocks.0.0.weight": (320, 4, 3, 3),
                 "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024)}
MOTION_MODULE = {"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": (320, 320)}
VIT_L = {"vision_model.embeddings.class_embedding": (1024,), "vision_model.post_layernorm.weight": (1024,)}
VIT_BIGG = {"vision_model.embeddings.class_embedding": (1664,), "vision_model.post_layernorm.weight": (1664,)}
IP_ADAPTER_PLUS = {"image_proj.latents": (1, 16, 768), "image_proj.proj_in.weight": (768, 1280),
                   "ip_adapter.1.to_k_ip.weight": (320, 768), "ip_adapter.1.to_v_ip.weight": (320, 768)}
FACEID = {"image_proj.proj.0.weight": (1024, 512), "ip_adapter.1.to_k_ip.weight": (320, 768),
          "ip_adapter.1.to_q_lora.down.weight": (128, 320)}
# UniAnimate's UNet (official unet_UniAnimate.py): pose and reference-pose embeddings, a 12-channel
# first convolution (4 latent + 8 condition channels)
UNIANIMATE_UNET = {"dwpose_embedding.0.weight": (16, 3, 3, 3), "randomref_embedding2.0.weight": (16, 3, 3, 3),
                   "input_blocks.0.0.weight": (320, 12, 3, 3)}

# name -> (file name, writer, words its message must hold)
BAD_FILES: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "empty": ("empty.ckpt", lambda p: p.write_bytes(b""), ["empty", "Re-download"]),
    "Git LFS pointer": ("lfs.safetensors", lambda p: p.write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:" + "0" * 64 + "\nsize 3944517836\n"),
        ["Git LFS pointer", "git lfs pull"]),
    "HTML page": ("login.ckpt", lambda p: p.write_text("<!DOCTYPE html><html><body>Sign in</body></html>"),
                  ["HTML page", "download the file itself"]),
    "unknown bytes": ("noise.bin", lambda p: p.write_bytes(bytes(range(256)) * 4), ["neither a safetensors"]),
    "truncated safetensors": ("cut.safetensors", _truncated_safetensors, ["truncated or partial", "re-download"]),
    "truncated zip": ("cut.ckpt", _truncated_zip, ["truncated or partial", "re-download"]),
    "pickle with code": ("evil.ckpt", _code_pickle, ["refused", "NOT loaded", "asks for the Python object", "print"]),
    "not a dict": ("list.pt", lambda p: torch.save([torch.zeros(2)], p), ["holds a list"]),
    "SDXL checkpoint": ("sdxl.safetensors", lambda p: _safetensors(p, SDXL_UNET), ["SDXL model checkpoint"]),
    "SD2 UNet": ("sd2_unet.safetensors", lambda p: _safetensors(p, SD2_UNET_ONLY), ["SD2.x UNet-only"]),
    "motion module": ("mm.safetensors", lambda p: _safetensors(p, MOTION_MODULE), ["AnimateDiff motion module"]),
    "ViT-L": ("vit_l.safetensors", lambda p: _safetensors(p, VIT_L), ["CLIP ViT-L/14", "models/clip_vision/"]),
    "ViT-bigG": ("vit_bigg.safetensors", lambda p: _safetensors(p, VIT_BIGG), ["CLIP ViT-bigG/14"]),
    "IP-Adapter Plus": ("ip_plus.safetensors", lambda p: _safetensors(p, IP_ADAPTER_PLUS),
                        ["IP-Adapter Plus file for SD1.5", "models/ipadapter/"]),
    "IP-Adapter FaceID": ("faceid.safetensors", lambda p: _safetensors(p, FACEID), ["IP-Adapter FaceID"]),
    "UniAnimate UNet": ("unianimate.safetensors", lambda p: _safetensors(p, UNIANIMATE_UNET),
                        ["UniAnimate video UNet", "models/unianimate/"]),
}


def write_bad_file(folder: Path, name: str) -> Path:
    """Write the table's entry `name` into `folder`; returns its path."""
    file_name, write, _ = BAD_FILES[name]
    path = folder / file_name
    folder.mkdir(parents=True, exist_ok=True)
    write(path)
    return path
