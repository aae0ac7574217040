"""Full-size random-weight models for the test bed, generated once into the cache.

Generation imports ComfyUI's model classes, which must see `--cpu` before anything else imports
`comfy`: `ensure_models` therefore runs this module in a subprocess (`python -m support.models`).

ComfyUI recognises SD1.5 and CLIP ViT-H/14 by their state-dict shapes, so tiny models will not
do; the shapes here come from ComfyUI's own model classes (built on the meta device). Weights
are N(0, 1/fan_in) with unit norm scales and zero biases, which keeps activations finite over a
few sampling steps. Nothing generated here is ever committed.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

GENERATOR_VERSION = "1"  # bump when the recipe below changes, to regenerate the cache


def random_like_shapes(shapes: dict[str, torch.Size], seed: int, dtype=torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(shapes.items()):
        if len(shape) >= 2:
            fan_in = int(torch.tensor(shape[1:]).prod())
            t = torch.randn(shape, generator=gen) * fan_in ** -0.5
        elif key.endswith("weight") or key.endswith("scale"):
            t = torch.ones(shape)  # norm scales
        else:
            t = torch.zeros(shape)
        out[key] = t.to(dtype)
    return out


def sd15_unet_shapes(**overrides) -> dict[str, torch.Size]:
    import comfy.supported_models
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = dict(comfy.supported_models.SD15.unet_config)
    config.update(in_channels=4, out_channels=4, num_res_blocks=[2, 2, 2, 2],
                  channel_mult=[1, 2, 4, 4], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                  transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                  model_channels=320, num_head_channels=-1, num_heads=8, context_dim=768,
                  use_linear_in_transformer=False, adm_in_channels=None, use_temporal_attention=False,
                  use_temporal_resblock=False, image_size=32,
                  use_spatial_transformer=True, legacy=False)
    config.pop("use_checkpoint", None)
    config.update(overrides)
    with torch.device("meta"):
        unet = UNetModel(**config, device="meta")
    return {k: v.shape for k, v in unet.state_dict().items()}


def clip_vision_shapes(config_name: str = "clip_vision_config_h.json") -> dict[str, torch.Size]:
    import comfy.clip_vision
    import comfy.clip_model
    import json

    path = Path(comfy.clip_vision.__file__).parent / config_name
    config = json.loads(path.read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPVisionModelProjection(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in model.state_dict().items()}


def cached_file(cache: Path, name: str, make: Callable[[Path], None]) -> Path:
    """Return cache/<version>/<name>, creating it with `make(tmp_path)` under a lock."""
    path = cache / "generated" / f"v{GENERATOR_VERSION}" / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_name(f".{name}.{os.getpid()}.tmp")
            make(tmp)
            os.replace(tmp, path)
    return path


def sd15_unet(cache: Path) -> Path:
    return cached_file(cache, "sd15_unet",
                       lambda p: save_file(random_like_shapes(sd15_unet_shapes(), seed=15), str(p)))


def clip_vision_h(cache: Path) -> Path:
    return cached_file(cache, "clip_vision_h",
                       lambda p: save_file(random_like_shapes(clip_vision_shapes(), seed=14), str(p)))


def id_animator_checkpoint(cache: Path) -> Path:
    """A random adapter in the official `state_dict` container, as animator.ckpt ships."""
    from id_animator.adapter.checkpoint import official_state_dict, random_adapter_weights

    return cached_file(cache, "id_animator_checkpoint", lambda p: torch.save(
        official_state_dict(random_adapter_weights(seed=7), layout="state_dict"), str(p)))


def scrfd_pack(cache: Path, scrfd_root: Path) -> Path:
    """An insightface pack folder holding only the real SCRFD detector from the scrfd sdist."""
    pack = cache / "generated" / "insightface" / "scrfd"
    pack.mkdir(parents=True, exist_ok=True)
    onnx = pack / "scrfd.onnx"
    if not onnx.exists():
        onnx.symlink_to(scrfd_root / "models" / "scrfd.onnx")
    return pack


def clip_l_text_shapes() -> dict[str, torch.Size]:
    import comfy.clip_model
    import json

    import comfy.sd1_clip

    config = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in model.state_dict().items()}


def clip_l_text(cache: Path) -> Path:
    """SD1.5's text encoder (CLIP ViT-L/14 text tower) for CLIPLoader type stable_diffusion."""
    return cached_file(cache, "clip_l_text",
                       lambda p: save_file(random_like_shapes(clip_l_text_shapes(), seed=13), str(p)))


def sd2_unet(cache: Path) -> Path:
    """An SD2.x UNet (context width 1024): a real model ApplyFaceAdapter must refuse."""
    shapes = sd15_unet_shapes(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)
    return cached_file(cache, "sd2_unet", lambda p: save_file(random_like_shapes(shapes, seed=21), str(p)))


def clip_vision_l(cache: Path) -> Path:
    """CLIP ViT-L/14 vision: the wrong encoder for ID-Animator (users confuse it with ViT-H)."""
    return cached_file(cache, "clip_vision_l", lambda p: save_file(
        random_like_shapes(clip_vision_shapes("clip_vision_config_vitl.json"), seed=12), str(p)))


def sd15_vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return {k: v.shape for k, v in vae.state_dict().items()}


def sd15_checkpoint(cache: Path) -> Path:
    """A single-file SD1.5 checkpoint (UNet + VAE + CLIP-L text), as community checkpoints ship."""
    def make(path: Path) -> None:
        state = {f"model.diffusion_model.{k}": v for k, v in random_like_shapes(sd15_unet_shapes(), seed=15).items()}
        state.update({f"first_stage_model.{k}": v for k, v in random_like_shapes(sd15_vae_shapes(), seed=16).items()})
        state.update({f"cond_stage_model.transformer.{k}": v
                      for k, v in random_like_shapes(clip_l_text_shapes(), seed=13).items()})
        save_file(state, str(path))

    return cached_file(cache, "sd15_checkpoint", make)


GENERATORS = {  # models/<folder>/<file name>: generator (several files may share a folder)
    ("checkpoints", "sd15_random_full.safetensors"): sd15_checkpoint,
    ("diffusion_models", "sd15_random_unet.safetensors"): sd15_unet,
    ("diffusion_models", "sd2_random_unet.safetensors"): sd2_unet,
    ("text_encoders", "clip_l_random.safetensors"): clip_l_text,
    ("clip_vision", "CLIP-ViT-H-14-random.safetensors"): clip_vision_h,
    ("clip_vision", "CLIP-ViT-L-14-random.safetensors"): clip_vision_l,
    ("id_animator", "animator.ckpt"): id_animator_checkpoint,
}


def ensure_models(cache: Path, comfyui: Path, scrfd_root: Path) -> dict[str, dict[str, Path]]:
    """Every model folder of the test bed, keyed like ComfyUI's `models/` layout."""
    import subprocess
    import sys

    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))  # id_animator, support
    subprocess.run([sys.executable, "-m", "support.models", str(cache), str(comfyui)], check=True,
                   cwd=Path(__file__).resolve().parent.parent, env=env)
    files: dict[str, dict[str, Path]] = {}
    for (folder, name), make in GENERATORS.items():
        files.setdefault(folder, {})[name] = cache / "generated" / f"v{GENERATOR_VERSION}" / make.__name__
    files["insightface"] = {"models/scrfd": scrfd_pack(cache, scrfd_root)}
    return files


def _main(cache: str, comfyui: str) -> None:
    import sys

    sys.path.insert(0, comfyui)
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = ["models", "--cpu"]
    for make in GENERATORS.values():
        made = make(Path(cache))
        assert made.name == make.__name__, (made, make.__name__)


if __name__ == "__main__":
    import sys

    _main(*sys.argv[1:3])
