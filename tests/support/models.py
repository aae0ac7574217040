"""Full-size random-weight models for the test bed, generated once into the cache.

Generation imports ComfyUI's model classes, which must see `--cpu` before anything else imports
`comfy`: `ensure_models` therefore runs this module in a subprocess (`python -m support.models`).

ComfyUI (and AnimateDiff-Evolved, Advanced-ControlNet) recognise models by their state-dict
shapes, so tiny models will not do; the shapes here come from ComfyUI's own model classes (built
on the meta device) or, for the motion and control files, from `support.motion_models`. Weights
are N(0, 1/fan_in) with unit norm scales and zero biases, which keeps activations finite over a
few sampling steps. Nothing generated here is ever committed.

Each file lives at `<cache>/generated/<generator>.<key>`, the key hashing everything that decides
its bytes (see `content_key`), so checkouts at different commits never share, or overwrite, a
file that one of them would have made differently.
"""
from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import inspect
import os
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from support import motion_models

REPO = Path(__file__).resolve().parents[2]
UNUSED_AFTER_S = 30 * 24 * 3600  # generated files no checkout has asked for this long are deleted


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


def sd15_unet_config(**overrides: Any) -> dict[str, Any]:
    """SD1.5's UNet config in the form ComfyUI's model detection produces (per-block lists)."""
    import comfy.supported_models

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
    return config


def sd15_unet_shapes(**overrides: Any) -> dict[str, torch.Size]:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**sd15_unet_config(**overrides), device="meta")
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


def clip_l_text_shapes() -> dict[str, torch.Size]:
    import comfy.clip_model
    import json

    import comfy.sd1_clip

    config = json.loads((Path(comfy.sd1_clip.__file__).parent / "sd1_clip_config.json").read_text())
    with torch.device("meta"):
        model = comfy.clip_model.CLIPTextModel(config, torch.float32, "meta", comfy.ops.disable_weight_init)
    return {k: v.shape for k, v in model.state_dict().items()}


def sd15_vae_shapes() -> dict[str, torch.Size]:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    return {k: v.shape for k, v in vae.state_dict().items()}


# --- Generators: each writes one file at the path it is given --------------------------------------


def sd15_unet(path: Path) -> None:
    save_file(random_like_shapes(sd15_unet_shapes(), seed=15), str(path))


def clip_vision_h(path: Path) -> None:
    save_file(random_like_shapes(clip_vision_shapes(), seed=14), str(path))


def id_animator_checkpoint(path: Path) -> None:
    """A random adapter in the official `state_dict` container, as animator.ckpt ships."""
    from id_animator.adapter.checkpoint import official_state_dict, random_adapter_weights

    torch.save(official_state_dict(random_adapter_weights(seed=7), layout="state_dict"), str(path))


def clip_l_text(path: Path) -> None:
    """SD1.5's text encoder (CLIP ViT-L/14 text tower) for CLIPLoader type stable_diffusion."""
    save_file(random_like_shapes(clip_l_text_shapes(), seed=13), str(path))


def sd2_unet(path: Path) -> None:
    """An SD2.x UNet (context width 1024): a real model ApplyFaceAdapter must refuse."""
    shapes = sd15_unet_shapes(context_dim=1024, num_heads=-1, num_head_channels=64, use_linear_in_transformer=True)
    save_file(random_like_shapes(shapes, seed=21), str(path))


def sd2_clip_h_shapes() -> dict[str, torch.Size]:
    """SD2.x's text encoder (OpenCLIP ViT-H/14 text tower, 24 blocks of 1024) as ComfyUI holds it."""
    from comfy.text_encoders import sd2_clip

    with torch.device("meta"):
        model = sd2_clip.SD2ClipHModel(dtype=torch.float32, device="meta")
    return {k: v.shape for k, v in model.transformer.state_dict().items()}


def sd2_text_encoder(path: Path) -> None:
    """The SD2.1 text encoder for CLIPLoader (type stable_diffusion: ComfyUI detects CLIP-H), fp16 as
    the released model.fp16.safetensors: UniAnimate's zero_y (the shipped UniAnimate workflows)."""
    save_file(random_like_shapes(sd2_clip_h_shapes(), seed=22), str(path))


def sd2_vae(path: Path) -> None:
    """The SD2.1 VAE for VAELoader (kl-f8, the same shapes as SD1.5's; own weights), fp16."""
    save_file(random_like_shapes(sd15_vae_shapes(), seed=23), str(path))


def clip_vision_l(path: Path) -> None:
    """CLIP ViT-L/14 vision: the wrong encoder for ID-Animator (users confuse it with ViT-H)."""
    save_file(random_like_shapes(clip_vision_shapes("clip_vision_config_vitl.json"), seed=12), str(path))


def sd15_checkpoint(path: Path) -> None:
    """A single-file SD1.5 checkpoint (UNet + VAE + CLIP-L text), as community checkpoints ship."""
    state = {f"model.diffusion_model.{k}": v for k, v in random_like_shapes(sd15_unet_shapes(), seed=15).items()}
    state.update({f"first_stage_model.{k}": v for k, v in random_like_shapes(sd15_vae_shapes(), seed=16).items()})
    state.update({f"cond_stage_model.transformer.{k}": v
                  for k, v in random_like_shapes(clip_l_text_shapes(), seed=13).items()})
    save_file(state, str(path))


def motion_weights(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the real sinusoidal frame-position tables. The output projections are
    random too (AnimateDiff zeroes them only to start training), so the modules do change the
    frames and a motion model that is silently not applied shows in the output."""
    state = random_like_shapes(shapes, seed=seed)
    motion_models.set_position_tables(state)
    return state


# Motion and control files are plain tensor dicts written by torch.save, as guoyww's and
# lllyasviel's releases are: their loaders read them with torch.load(weights_only=True).


def animatediff_v2(path: Path) -> None:
    """AnimateDiff v2 (mm_sd_v15_v2.ckpt): down, up and mid-block motion modules."""
    torch.save(motion_weights(motion_models.motion_model_shapes(mid_block=True), seed=2), str(path))


def animatediff_v3(path: Path) -> None:
    """AnimateDiff v3 (v3_sd15_mm.ckpt): down and up motion modules, no mid block."""
    torch.save(motion_weights(motion_models.motion_model_shapes(mid_block=False), seed=3), str(path))


def sparsectrl_rgb(path: Path) -> None:
    """SparseCtrl RGB (v3_sd15_sparsectrl_rgb.ckpt): a ControlNet with its own motion modules."""
    torch.save(motion_weights(motion_models.sparsectrl_rgb_shapes(sd15_unet_config()), seed=31), str(path))


def controlnet_openpose(path: Path) -> None:
    """An SD1.5 ControlNet 1.1 (control_v11p_sd15_openpose.pth): 3-channel pose images in."""
    shapes = motion_models.lllyasviel_controlnet_shapes(sd15_unet_config(), hint_channels=3)
    torch.save(random_like_shapes(shapes, seed=41), str(path))


@dataclass(frozen=True)
class Recipe:
    """One generated file: the generator that writes it and the checkout files, beyond the
    definitions the generator reaches in the model modules, that decide its bytes."""
    write: Callable[[Path], None]
    sources: tuple[str, ...] = ()  # globs relative to the repository root

    @property
    def name(self) -> str:
        return self.write.__name__


GENERATORS: dict[tuple[str, str], Recipe] = {  # models/<folder>/<file name>: recipe (a folder may hold several)
    ("checkpoints", "sd15_random_full.safetensors"): Recipe(sd15_checkpoint),
    ("diffusion_models", "sd15_random_unet.safetensors"): Recipe(sd15_unet),
    ("diffusion_models", "sd2_random_unet.safetensors"): Recipe(sd2_unet),
    ("text_encoders", "clip_l_random.safetensors"): Recipe(clip_l_text),
    ("text_encoders", "sd2_clip_h_random.safetensors"): Recipe(sd2_text_encoder),
    ("vae", "sd2_vae_random.safetensors"): Recipe(sd2_vae),
    ("clip_vision", "CLIP-ViT-H-14-random.safetensors"): Recipe(clip_vision_h),
    ("clip_vision", "CLIP-ViT-L-14-random.safetensors"): Recipe(clip_vision_l),
    ("id_animator", "animator.ckpt"): Recipe(id_animator_checkpoint, sources=("adapter/*.py",)),
    # the names the shipped workflows use (scripts/workflow_spec.py MODELS)
    ("animatediff_models", "mm_sd_v15_v2.ckpt"): Recipe(animatediff_v2),
    ("animatediff_models", "v3_sd15_mm.ckpt"): Recipe(animatediff_v3),
    ("controlnet", "v3_sd15_sparsectrl_rgb.ckpt"): Recipe(sparsectrl_rgb),
    ("controlnet", "control_v11p_sd15_openpose.pth"): Recipe(controlnet_openpose),
}


# --- The cache -------------------------------------------------------------------------------------


def _code_names(code: types.CodeType) -> set[str]:
    """Global and attribute names a code object (and the functions nested in it) refers to."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _reached_definitions(write: Callable[[Path], None]) -> list[str]:
    """The source of `write` and of every function, class and plain constant of this module and
    `motion_models` that it names, followed transitively. Matching by name may take in a few
    definitions it does not use: the key then changes more often than needed, which only costs a
    regeneration."""
    modules = [sys.modules[__name__], motion_models]
    parts: list[str] = []
    seen: set[int] = set()
    pending: list[Any] = [write]
    while pending:
        obj = pending.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        parts.append(inspect.getsource(obj))
        functions = [obj] if inspect.isfunction(obj) else [f for f in vars(obj).values() if inspect.isfunction(f)]
        # defaults are evaluated where the function is defined, so a named constant there is a value
        parts.extend(repr((f.__defaults__, f.__kwdefaults__)) for f in functions)
        for name in sorted(set().union(*(_code_names(f.__code__) for f in functions))):
            if name.startswith("__"):
                continue  # module attributes such as __file__ name the checkout, not the model: a clone elsewhere must hit
            for module in modules:
                value = vars(module).get(name)
                if inspect.isfunction(value) or inspect.isclass(value):
                    if value.__module__ == module.__name__:
                        pending.append(value)
                elif isinstance(value, (bool, int, float, str, tuple)):
                    # labelled by file, not module name: this module is `__main__` when it generates
                    parts.append(f"{Path(module.__file__).name}:{name} = {value!r}")
    return parts


def content_key(recipe: Recipe, comfyui: Path) -> str:
    """sha256 over what decides the file's bytes: the generator's source and the helpers and
    constants it reaches here, the checkout files it names (`Recipe.sources`), the ComfyUI version
    whose classes give the shapes, and the torch version whose generator draws the weights."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for part in _reached_definitions(recipe.write):
        add("definition", part.encode())
    for pattern in recipe.sources:
        for path in sorted(REPO.glob(pattern)):
            add(str(path.relative_to(REPO)), path.read_bytes())
    add("comfyui", (comfyui / "comfyui_version.py").read_bytes())
    add("torch", importlib.metadata.version("torch").encode())
    return digest.hexdigest()[:20]


def generated_path(cache: Path, recipe: Recipe, comfyui: Path) -> Path:
    return cache / "generated" / f"{recipe.name}.{content_key(recipe, comfyui)}"


def cached_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Return `path`, creating it with `write(tmp_path)` under a lock (concurrent sessions)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            started = time.monotonic()
            write(tmp)
            os.replace(tmp, path)
            print(f"generated {path.name}: {path.stat().st_size / 2**20:.0f} MiB in {time.monotonic() - started:.1f} s",
                  file=sys.stderr)
    return path


def _used_marker(path: Path) -> Path:
    return path.with_name(f".{path.name}.used")


def prune_unused(cache: Path, name: str, keep: Path) -> None:
    """Delete the generated files `name.*` made for other sources that nobody has used for a month
    (each `ensure_models` touches a marker beside the files it returns, never the file itself: the
    pack keys loaded models by file version, mtime included, so touching a model under a running
    ComfyUI would make its next loader load a second copy), so the cache does not grow forever."""
    _used_marker(keep).touch()
    for old in (cache / "generated").glob(f"{name}.*"):
        marker = _used_marker(old)
        last_use = (marker if marker.exists() else old).stat().st_mtime
        if old != keep and time.time() - last_use > UNUSED_AFTER_S:
            old.unlink(missing_ok=True)
            marker.unlink(missing_ok=True)
            old.with_name(f".{old.name}.lock").unlink(missing_ok=True)


def scrfd_pack(cache: Path, scrfd_root: Path) -> Path:
    """An insightface pack folder holding the real SCRFD detector from the scrfd sdist (a folder
    per sdist location, so its link never points at another session's copy) and, as buffalo_l
    holds w600k_r50.onnx, a random-weight recognition model for FaceSimilarity (support.arcface)."""
    from support.arcface import write_arcface

    where = hashlib.sha256(str(scrfd_root.resolve()).encode()).hexdigest()[:16]
    pack = cache / "generated" / "insightface" / where / "scrfd"
    pack.mkdir(parents=True, exist_ok=True)
    onnx = pack / "scrfd.onnx"
    if not onnx.is_symlink():
        onnx.symlink_to(scrfd_root / "models" / "scrfd.onnx")
    write_arcface(pack / "arcface_random.onnx")
    return pack


def ensure_models(cache: Path, comfyui: Path, scrfd_root: Path) -> dict[str, dict[str, Path]]:
    """Every model folder of the test bed, keyed like ComfyUI's `models/` layout."""
    import subprocess

    # support, and this checkout's id_animator (tests/conftest.py: one import path per checkout)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, "-m", "support.models", str(cache), str(comfyui)], check=True,
                   cwd=Path(__file__).resolve().parent.parent, env=env)
    files: dict[str, dict[str, Path]] = {}
    for (folder, name), recipe in GENERATORS.items():
        path = generated_path(cache, recipe, comfyui)
        if not path.exists():  # the subprocess computes the same key: a miss is a bug, not a rerun
            raise RuntimeError(f"support.models did not generate {path}")
        prune_unused(cache, recipe.name, keep=path)
        files.setdefault(folder, {})[name] = path
    files["insightface"] = {"models/scrfd": scrfd_pack(cache, scrfd_root)}
    return files


def _main(cache: str, comfyui: str) -> None:
    sys.path.insert(0, comfyui)
    import comfy.options

    comfy.options.enable_args_parsing()
    sys.argv = ["models", "--cpu"]
    for recipe in GENERATORS.values():
        cached_file(generated_path(Path(cache), recipe, Path(comfyui)), recipe.write)


if __name__ == "__main__":
    _main(*sys.argv[1:3])
