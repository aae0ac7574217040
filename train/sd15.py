"""The frozen models of training, loaded offline from the files users already have.

- `load_vae`, `load_text_encoder`, `load_unet`: from a single-file SD1.5 checkpoint (any community
  model: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`), the
  UNet joined with an AnimateDiff motion module file (v1, v2 or v3 layout) into diffusers'
  `UNetMotionModel`;
- `load_image_encoder`: the CLIP ViT-H/14 file of ComfyUI's `clip_vision` folder, as transformers'
  `CLIPVisionModelWithProjection`, and `clip_penultimate`, the image path of the adapter (CLIP
  normalisation, penultimate hidden state: official §4.3, the same maths as our FaceEncode node);
- `noise_scheduler`: AnimateDiff's training schedule.

diffusers' `from_single_file` fetches each model's config from the hub; training must run offline,
so the configs are written here and diffusers' own key conversions are called directly. Every
key of a file is accounted for: a converted key no model takes, a model weight no key fills, or a
file key the conversion left behind is a `CheckpointError` that says what the file looks like
(an SDXL checkpoint, a motion module given as checkpoint, ViT-L instead of ViT-H...).
All returned models are frozen: `requires_grad_(False)` and `eval()`.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..adapter.checkpoint import check_clip_vision_h, clip_vision_expected
from ..adapter.clip_image import normalize
from ..adapter.errors import CheckpointError, TrainingError
from ..adapter.weights_file import KINDS, WeightsFile, expect_kind, identify

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

# SD1.5 (runwayml/stable-diffusion-v1-5 unet/config.json), the diffusers names of its LDM UNet.
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn", downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
    norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False,
)

# SD1.5's KL-f8 autoencoder (vae/config.json); 0.18215 is the latent scale of every SD1.x model.
SD15_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, act_fn="silu",
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)

# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14), SD1.5's text encoder.
CLIP_L_TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)

# OpenCLIP ViT-H/14 (laion2B-s32B-b79K) in transformers' terms: IP-Adapter's image encoder config.
VIT_H_CONFIG: dict[str, Any] = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14,
    image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)

# AnimateDiff v2 (guoyww/animatediff-motion-adapter-v1-5-2); the mid block and the length of the
# position tables are read from the file, so v1 (24 positions, no mid block) and v3 load too.
MOTION_ADAPTER_CONFIG: dict[str, Any] = dict(
    block_out_channels=(320, 640, 1280, 1280), motion_layers_per_block=2, motion_mid_block_layers_per_block=1,
    motion_num_attention_heads=8, motion_norm_num_groups=32, motion_max_seq_length=32, use_motion_mid_block=True,
)

# Keys of SD1.x checkpoints that no frozen model reads: LDM's copy of the DDPM schedule (the
# trainer uses `noise_scheduler()`), EMA bookkeeping, and the text tower's pooled-output
# projection, which ComfyUI writes when it saves a checkpoint and SD1.5 never applies.
SCHEDULE_BUFFERS = frozenset({
    "alphas_cumprod", "alphas_cumprod_prev", "betas", "log_one_minus_alphas_cumprod", "logvar",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance",
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "model_ema.decay", "model_ema.num_updates",
})
UNUSED_TEXT_KEYS = frozenset({f"{TEXT_PREFIX}text_projection.weight",
                              f"{TEXT_PREFIX}text_model.embeddings.position_ids"})


# --- What a file is ---------------------------------------------------------------------------------

SD15_WANTED = ("an SD1.5 single-file checkpoint, which ID-Animator trains on (UNet, VAE and text encoder in one "
               "file, e.g. v1-5-pruned-emaonly.safetensors or a community SD1.5 model, from models/checkpoints/)")
MOTION_WANTED = ("an AnimateDiff motion module for SD1.5 (mm_sd_v15_v2.ckpt, v3_sd15_mm.ckpt: the "
                 "animatediff_models folder)")


def describe(file: WeightsFile) -> str:
    """What a weights file looks like, for error messages (the shared `weights_file.KINDS` table)."""
    kind = identify(file.shapes)
    if kind is not None:
        return KINDS[kind].description
    return f"an unknown file (first keys: {', '.join(list(file.shapes)[:3]) or 'none'})"


def _unconsumed(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> list[str]:
    """Source keys whose tensor no converted entry holds. The conversions rename keys and at most
    slice (1x1 convolutions to linear), so a consumed tensor keeps its data pointer."""
    used = {t.data_ptr() for t in converted.values()}
    return sorted(k for k, t in source.items() if t.data_ptr() not in used)


def _assign(model: torch.nn.Module, state: dict[str, torch.Tensor], file: WeightsFile, what: str,
            dtype: torch.dtype, device: torch.device | str) -> None:
    """Load `state` into a model built on the meta device, strictly, each tensor cast once."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{file.path.name} is not a usable {what}: it looks like {describe(file)}. "
            f"{len(missing)} weights missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}).")
    reference = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(reference[key].shape):
            raise CheckpointError(
                f"{file.path.name} is not a usable {what}: it looks like {describe(file)}; {key} has shape "
                f"{tuple(tensor.shape)}, {what} needs {tuple(reference[key].shape)}.")
    cast = {}
    for key in list(state):  # popped as cast, so the file's copy and ours never both stay whole
        tensor = state.pop(key)
        cast[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
    model.load_state_dict(cast, strict=True, assign=True)


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    return model.requires_grad_(False).eval()


def _part(file: WeightsFile, prefix: str, what: str) -> dict[str, torch.Tensor]:
    keys = file.keys(prefix)
    if not keys:
        raise CheckpointError(
            f"{file.path} has no {what} ({prefix}* keys): it looks like {describe(file)}. Give a single-file "
            f"SD1.5 checkpoint (the checkpoints folder: UNet, VAE and text encoder in one file).")
    return {k: file.get(k) for k in keys}


def _check_sd15(file: WeightsFile) -> None:
    expect_kind(file.path, file.shapes, {"sd15-checkpoint"}, SD15_WANTED)


def _unknown_keys(file: WeightsFile) -> list[str]:
    """Keys of an SD1.5 checkpoint outside the three models that are not known bookkeeping (the
    DDPM schedule buffers, EMA counters and copies, the unused text projection). A real file
    has none; the loaders ignore these with a warning rather than refuse a working model."""
    parts = (UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX, "model_ema.")
    return sorted(k for k in file.shapes
                  if not k.startswith(parts) and k not in SCHEDULE_BUFFERS and k not in UNUSED_TEXT_KEYS)


def _warn_unknown(file: WeightsFile) -> None:
    if unknown := _unknown_keys(file):
        log.warning("%s: %d keys belong to none of the UNet, VAE and text encoder, ignored: %s",
                    file.path.name, len(unknown), ", ".join(unknown[:5]))


# --- VAE -------------------------------------------------------------------------------------------


def load_vae(checkpoint: str | Path, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu"):
    """The checkpoint's VAE as diffusers' `AutoencoderKL` (a standalone SD VAE file works too)."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    file = WeightsFile(checkpoint)
    standalone = identify(file.shapes) == "vae"
    if not standalone:
        _check_sd15(file)
        _warn_unknown(file)
    source = (file.tensors() if standalone else _part(file, VAE_PREFIX, "VAE"))
    source = {k: v for k, v in source.items() if not k.startswith("loss.") and k not in SCHEDULE_BUFFERS}
    converted = convert_ldm_vae_checkpoint(source, SD15_VAE_CONFIG)
    if left := _unconsumed(source, converted):
        raise CheckpointError(f"{file.path.name}: the VAE conversion left {len(left)} keys unused (e.g. {left[:3]}); "
                              f"it looks like {describe(file)}, not an SD1.5 VAE.")
    with init_empty_weights():
        vae = AutoencoderKL(**SD15_VAE_CONFIG)
    _assign(vae, converted, file, "SD1.5 VAE", dtype, device)
    return _frozen(vae)


# --- Text encoder ----------------------------------------------------------------------------------


def default_tokenizer_dir(pack: Path | None = None) -> Path | None:
    """ComfyUI's copy of the SD1.x CLIP tokenizer (`comfy/sd1_tokenizer`), found from this pack
    (default: the pack holding this module, through a link or not) when it sits in
    `ComfyUI/custom_nodes/` (read as data files: ComfyUI is never imported)."""
    here = Path(__file__)
    packs = (pack,) if pack is not None else (here.parent.parent, here.resolve().parent.parent)
    for pack in dict.fromkeys(packs):
        candidate = pack.parent.parent / "comfy" / "sd1_tokenizer"
        if pack.parent.name == "custom_nodes" and (candidate / "vocab.json").is_file():
            return candidate
    return None


def load_tokenizer(tokenizer_dir: str | Path | None = None):
    from transformers import CLIPTokenizer

    folder = Path(tokenizer_dir) if tokenizer_dir is not None else default_tokenizer_dir()
    if folder is None:
        raise TrainingError(
            "The SD1.5 CLIP tokenizer was not found: no checkpoint holds it, and this pack is not inside "
            "ComfyUI/custom_nodes (whose comfy/sd1_tokenizer folder is used by default). Pass --tokenizer DIR, "
            "a folder with vocab.json and merges.txt (ComfyUI/comfy/sd1_tokenizer, or the tokenizer folder of "
            "an SD1.5 diffusers model).")
    if not (folder / "vocab.json").is_file() or not (folder / "merges.txt").is_file():
        raise TrainingError(f"{folder} is not a CLIP tokenizer folder: it needs vocab.json and merges.txt "
                            f"(e.g. ComfyUI/comfy/sd1_tokenizer).")
    # ComfyUI's copy says 8192 (it chunks long prompts itself); SD1.5 reads 77 tokens
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True,
                                         model_max_length=CLIP_L_TEXT_CONFIG["max_position_embeddings"])


def load_text_encoder(checkpoint: str | Path, tokenizer_dir: str | Path | None = None, *,
                      dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
    """(CLIPTextModel, CLIPTokenizer): SD1.5's CLIP ViT-L/14 text tower and its BPE tokenizer."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = load_tokenizer(tokenizer_dir)
    file = WeightsFile(checkpoint)
    _check_sd15(file)
    _warn_unknown(file)
    source = {k: v for k, v in _part(file, TEXT_PREFIX, "text encoder").items() if k not in UNUSED_TEXT_KEYS}
    converted = convert_ldm_clip_checkpoint(source)
    if left := _unconsumed(source, converted):
        raise CheckpointError(f"{file.path.name}: {len(left)} text-encoder keys were not converted (e.g. {left[:3]}).")
    with init_empty_weights():
        model = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT_CONFIG))
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        # transformers 5 dropped CLIPTextModel's `text_model` wrapper; checkpoints keep the name
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    _assign(model, converted, file, "CLIP ViT-L/14 text encoder", dtype, device)
    return _frozen(model), tokenizer


def encode_prompts(text_encoder, tokenizer, prompts: Iterable[str]) -> torch.Tensor:
    """(B, 77, 768): SD1.5's text condition, the last hidden state of 77 padded tokens."""
    length = text_encoder.config.max_position_embeddings
    ids = tokenizer(list(prompts), padding="max_length", max_length=length,
                    truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


# --- UNet + motion module --------------------------------------------------------------------------


def _motion_state(file: WeightsFile) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A motion module file's weights in diffusers' `MotionAdapter` names, and its config.

    AnimateDiff stores a sinusoidal position table per temporal attention (`pos_encoder.pe`, two
    per block); diffusers keeps one per block (`pos_embed.pe`) and uses it for both. The tables
    are checked against diffusers' (a module trained with other tables would be silently wrong)
    and the first of each pair becomes diffusers' buffer."""
    from diffusers.loaders.single_file_utils import convert_animatediff_checkpoint_to_diffusers

    expect_kind(file.path, file.shapes, {"motion-module"}, MOTION_WANTED)
    source = file.tensors()
    tables = {k: v for k, v in source.items() if k.endswith(".pos_encoder.pe")}
    converted = convert_animatediff_checkpoint_to_diffusers(source)
    length = 0
    for key, table in tables.items():
        block = key.split(".attention_blocks.")[0].replace(".temporal_transformer", "")
        length, width = table.shape[-2:]
        position = torch.arange(length).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, width, 2) * (-math.log(10000.0) / width))
        expected = torch.zeros(length, width)
        expected[:, 0::2], expected[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
        if not torch.allclose(table.reshape(length, width).float(), expected, atol=2e-3):
            raise CheckpointError(f"{file.path.name}: {key} is not AnimateDiff's sinusoidal position table; "
                                  f"this motion module is not in a layout diffusers can run.")
        converted.setdefault(f"{block}.pos_embed.pe", table.reshape(1, length, width))
    if left := sorted(set(_unconsumed(source, converted)) - set(tables)):  # a checked table is consumed
        raise CheckpointError(f"{file.path.name}: {len(left)} motion-module keys were not converted (e.g. {left[:3]}).")
    config = dict(MOTION_ADAPTER_CONFIG, motion_max_seq_length=length or MOTION_ADAPTER_CONFIG["motion_max_seq_length"],
                  use_motion_mid_block=any(k.startswith("mid_block.") for k in converted))
    return converted, config


def load_unet(checkpoint: str | Path, motion_module: str | Path, *, dtype: torch.dtype = torch.float32,
              device: torch.device | str = "cpu"):
    """The checkpoint's UNet with the motion module's temporal layers: diffusers' `UNetMotionModel`
    (input (B, C, F, H, W), one timestep per clip, text context (B*F, 77, 768))."""
    from accelerate import init_empty_weights
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    file = WeightsFile(checkpoint)
    _check_sd15(file)
    _warn_unknown(file)
    source = _part(file, UNET_PREFIX, "UNet")
    spatial = convert_ldm_unet_checkpoint(source, SD15_UNET_CONFIG)
    if left := _unconsumed(source, spatial):
        raise CheckpointError(f"{file.path.name}: {len(left)} UNet keys were not converted (e.g. {left[:3]}); "
                              f"it looks like {describe(file)}, not an SD1.5 UNet.")
    del source
    motion_file = WeightsFile(motion_module)
    motion, motion_config = _motion_state(motion_file)
    with init_empty_weights():
        unet2d = UNet2DConditionModel(**SD15_UNET_CONFIG)
        adapter = MotionAdapter(**motion_config)
        unet = UNetMotionModel.from_unet2d(unet2d, adapter, load_weights=False)
    # the file at fault is named: a key only the motion model holds is the motion file's
    motion_expected = {k for k in unet.state_dict() if ".motion_modules." in k}
    if set(motion) != motion_expected:
        missing, unexpected = sorted(motion_expected - set(motion)), sorted(set(motion) - motion_expected)
        raise CheckpointError(
            f"{motion_file.path.name} does not fit the SD1.5 UNet as an AnimateDiff motion module: {len(missing)} "
            f"weights missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}). "
            f"SDXL (mm_sdxl) and HotShot modules do not fit SD1.5.")
    if clash := sorted(set(spatial) & set(motion)):
        raise CheckpointError(f"{file.path.name} already holds motion weights (e.g. {clash[:2]}).")
    state = spatial  # one dict, emptied as it is cast (`_assign`)
    state.update(motion)
    del spatial, motion
    _assign(unet, state, file, "SD1.5 UNet", dtype, device)
    return _frozen(unet)


# --- CLIP image encoder ----------------------------------------------------------------------------


def load_image_encoder(path: str | Path, *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu"):
    """ComfyUI's clip_vision ViT-H/14 file (transformers layout, e.g. CLIP-ViT-H-14-laion2B-s32B-b79K
    .safetensors) as transformers' `CLIPVisionModelWithProjection`."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with clip_vision_expected():
        file = WeightsFile(path)
    check_clip_vision_h(file.path, file.shapes)  # the node's check too: the same message
    if file.keys("visual.transformer."):
        raise CheckpointError(f"{file.path} is {describe(file)} in OpenCLIP's layout; use the transformers-layout "
                              f"file ComfyUI's IP-Adapter guides name (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors).")
    state = {k: v for k, v in file.tensors().items() if k != "vision_model.embeddings.position_ids"}
    with init_empty_weights():
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H_CONFIG))
    _assign(model, state, file, "CLIP ViT-H/14 image encoder", dtype, device)
    return _frozen(model)


def clip_penultimate(image_encoder, crops: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) RGB crops (float in [0, 1] or uint8) -> (B, 257, 1280), the penultimate
    hidden state of the CLIP-normalised crops: the Resampler's input (official §4.3)."""
    param = next(image_encoder.parameters())
    pixels = normalize(crops).to(param.device, param.dtype)  # the pack's one CLIP preprocessing
    with torch.no_grad():
        return image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]


# --- Noise schedule --------------------------------------------------------------------------------


def noise_scheduler():
    """AnimateDiff's training schedule: DDPM, linear betas 0.00085 -> 0.012 over 1000 steps,
    epsilon prediction (its training.yaml; SD1.5's own schedule is scaled_linear)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="linear",
                         prediction_type="epsilon", clip_sample=False)
