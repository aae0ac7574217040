"""Key layouts of the motion and control models the shipped workflows name, for the test bed.

AnimateDiff-Evolved (ADE) and Advanced-ControlNet (ACN) decide what a file is from its key names
and shapes, so the random stand-ins `support.models` generates must have the exact layout of the
released files:
- AnimateDiff motion modules (guoyww's `mm_sd_v15_v2.ckpt`, `v3_sd15_mm.ckpt`),
- SparseCtrl RGB (`v3_sd15_sparsectrl_rgb.ckpt`): a diffusers-named ControlNet with its own
  motion modules,
- ControlNet 1.1 (lllyasviel's `control_v11p_sd15_openpose.pth`): ComfyUI's layout under
  `control_model.`.

The AnimateDiff and SparseCtrl layouts are written down here from reading ADE and ACN at the
pinned commits (each function cites what it follows), not taken from their classes, so that the
test bed can generate the files even where those sources are absent. The ControlNet parts come
from ComfyUI's own `comfy.cldm` class on the meta device and ComfyUI's own diffusers key map,
which are what both ComfyUI and ACN read the files with. Weights are filled in by
`support.models`; this module only says which tensors exist, plus the one non-random tensor
(the sinusoidal position table) that real motion modules carry.
"""
from __future__ import annotations

import math
from typing import Any

import torch

# The four UNet levels of SD1.5 (ADE AnimateDiffModel: layer_channels for SD1.5) and its middle
# block's width. A motion module sits at every level; ADE counts the levels (the largest
# down_blocks index, 3) to tell an SD1.5 motion model from an SDXL one (2).
SD15_LEVEL_CHANNELS = (320, 640, 1280, 1280)
SD15_MID_CHANNELS = 1280
# guoyww's v2, v3 and SparseCtrl files hold position tables of 32 frames; ADE calls a file without
# a mid block "v3" only when its tables are 32 long (v1's are 24).
POSITION_TABLE_LENGTH = 32


def temporal_module_shapes(channels: int, attention_blocks: int,
                           table_length: int = POSITION_TABLE_LENGTH) -> dict[str, torch.Size]:
    """One motion module, relative to `...motion_modules.<i>.`.

    Follows ADE animatediff/motion_module_ad.py (VanillaTemporalModule -> TemporalTransformer3DModel
    -> one TemporalTransformerBlock of "Temporal_Self" VersatileAttention blocks, as many as the
    file has: ADE counts `attention_blocks.<n>` keys) and animatediff/utils_motion.py
    (CrossAttentionMM): 8 heads of channels/8, so every projection is channels x channels; q/k/v
    have no bias, the output projection has one; each attention block carries its own position
    table `pos_encoder.pe` [1, length, channels]; the feed-forward is ComfyUI's GEGLU FeedForward
    (4x inner width, the input projection doubled for the gate).
    """
    c = channels
    square, vector = torch.Size([c, c]), torch.Size([c])
    shapes = {
        "temporal_transformer.norm.weight": vector,  # GroupNorm(32, c)
        "temporal_transformer.norm.bias": vector,
        "temporal_transformer.proj_in.weight": square,
        "temporal_transformer.proj_in.bias": vector,
        "temporal_transformer.proj_out.weight": square,
        "temporal_transformer.proj_out.bias": vector,
    }
    block = "temporal_transformer.transformer_blocks.0."
    for a in range(attention_blocks):
        attention = f"{block}attention_blocks.{a}."
        shapes.update({
            f"{attention}to_q.weight": square,
            f"{attention}to_k.weight": square,
            f"{attention}to_v.weight": square,
            f"{attention}to_out.0.weight": square,
            f"{attention}to_out.0.bias": vector,
            f"{attention}pos_encoder.pe": torch.Size([1, table_length, c]),
            f"{block}norms.{a}.weight": vector,
            f"{block}norms.{a}.bias": vector,
        })
    shapes.update({
        f"{block}ff.net.0.proj.weight": torch.Size([8 * c, c]),
        f"{block}ff.net.0.proj.bias": torch.Size([8 * c]),
        f"{block}ff.net.2.weight": torch.Size([c, 4 * c]),
        f"{block}ff.net.2.bias": vector,
        f"{block}ff_norm.weight": vector,
        f"{block}ff_norm.bias": vector,
    })
    return shapes


def motion_model_shapes(mid_block: bool, up_blocks: bool = True,
                        attention_blocks: int = 2) -> dict[str, torch.Size]:
    """An SD1.5 AnimateDiff motion model in guoyww's file layout.

    Follows ADE animatediff/motion_module_ad.py (AnimateDiffModel and MotionModule): at each of
    the four levels `down_blocks.<level>` holds two motion modules and `up_blocks.<level>` three
    (up levels run widest first), and `mid_block` one. ADE reads the version from the keys
    (normalize_ad_state_dict): a `mid_block.` key makes it v2; without one and with 32-frame
    position tables it is v3. AnimateDiff's own motion modules have two attention blocks each.
    """
    shapes: dict[str, torch.Size] = {}

    def add(prefix: str, channels: int) -> None:
        shapes.update({f"{prefix}.{k}": s for k, s in temporal_module_shapes(channels, attention_blocks).items()})

    for level, channels in enumerate(SD15_LEVEL_CHANNELS):
        for i in range(2):
            add(f"down_blocks.{level}.motion_modules.{i}", channels)
    if up_blocks:
        for level, channels in enumerate(reversed(SD15_LEVEL_CHANNELS)):
            for i in range(3):
                add(f"up_blocks.{level}.motion_modules.{i}", channels)
    if mid_block:
        add("mid_block.motion_modules.0", SD15_MID_CHANNELS)
    return shapes


def position_table(length: int, channels: int) -> torch.Tensor:
    """The fixed sinusoidal frame-position table [1, length, channels] (even channels sine, odd
    cosine, wavelengths geometric up to 10000), as every released motion module stores it: a
    random one would make the frames' order meaningless rather than just untrained."""
    position = torch.arange(length, dtype=torch.float64)[:, None]
    frequency = torch.exp(torch.arange(0, channels, 2, dtype=torch.float64) * (-math.log(10000.0) / channels))
    table = torch.zeros(1, length, channels, dtype=torch.float64)
    table[0, :, 0::2] = torch.sin(position * frequency)
    table[0, :, 1::2] = torch.cos(position * frequency)
    return table


def set_position_tables(state: dict[str, torch.Tensor]) -> None:
    """Replace every `pos_encoder.pe` in a randomly filled state dict by the real table."""
    for key, value in state.items():
        if key.endswith("pos_encoder.pe"):
            state[key] = position_table(value.shape[1], value.shape[2]).to(value.dtype)


def controlnet_shapes(unet_config: dict[str, Any], hint_channels: int) -> dict[str, torch.Size]:
    """ComfyUI's ControlNet (comfy/cldm/cldm.py) for a UNet config, in ComfyUI's key names: the
    UNet's input and middle blocks, the zero convolutions, `middle_block_out` and the 8-conv
    `input_hint_block` that takes `hint_channels`. ComfyUI's ControlNetLoader builds exactly this
    class from the file (comfy/controlnet.py load_controlnet_state_dict), as does ACN's SparseCtrl
    loader (a subclass)."""
    from comfy.cldm.cldm import ControlNet

    config = {k: v for k, v in unet_config.items() if k != "out_channels"}  # as the loader drops it
    with torch.device("meta"):
        model = ControlNet(**config, hint_channels=hint_channels, device="meta")
    return {k: v.shape for k, v in model.state_dict().items()}


def lllyasviel_controlnet_shapes(unet_config: dict[str, Any], hint_channels: int = 3) -> dict[str, torch.Size]:
    """A ControlNet 1.1 `.pth` (e.g. control_v11p_sd15_openpose): ComfyUI's ControlNet keys under
    `control_model.`, the prefix ComfyUI's loader recognises as the original release format."""
    return {f"control_model.{k}": s for k, s in controlnet_shapes(unet_config, hint_channels).items()}


# RGB SparseCtrl conditions on a VAE latent (4 channels, ACN RgbSparseCtrlPreprocessor) to which
# ACN appends the keyframe mask channel (SparseCtrlAdvanced.get_control_advanced); the scribble
# variant would take 3 RGB channels + mask through the full 8-conv embedding instead.
SPARSECTRL_RGB_HINT_CHANNELS = 4 + 1


def sparsectrl_rgb_shapes(unet_config: dict[str, Any]) -> dict[str, torch.Size]:
    """guoyww's SparseCtrl RGB file: a diffusers-named SD1.5 ControlNet whose condition embedding
    is one 3x3 convolution (`controlnet_cond_embedding.weight`), plus motion modules on the down
    levels only, each with a single attention block (SparseCtrl's released configuration: 497 M
    parameters in all, the published 1.99 GB at fp32, where two blocks would make 528 M).

    Follows ACN adv_control/control.py load_sparsectrl: keys containing "temporal" are split off
    as the motion model (loaded strictly by control_sparsectrl.py load_sparsectrl_motionmodel, so
    the set must be exact); the rest is read as diffusers names through ComfyUI's
    `unet_to_diffusers` map plus `controlnet_down_blocks.<n>` (zero convs), `controlnet_mid_block`
    and `controlnet_cond_embedding` (the simplified embedding, which marks the RGB variant). So
    here ComfyUI's ControlNet keys are renamed through the inverse of that same map.
    """
    import comfy.utils

    comfy_shapes = controlnet_shapes(unet_config, hint_channels=SPARSECTRL_RGB_HINT_CHANNELS)
    diffusers_to_comfy = comfy.utils.unet_to_diffusers(unet_config)  # despite its name: diffusers -> ComfyUI
    to_diffusers = {comfy_key: diffusers_key for diffusers_key, comfy_key in diffusers_to_comfy.items()}
    shapes: dict[str, torch.Size] = {}
    for key, shape in comfy_shapes.items():
        if key.startswith("input_hint_block."):
            continue  # replaced by the one-conv embedding below
        if key.startswith("zero_convs."):
            index, leaf = key.split(".")[1], key.rsplit(".", 1)[1]
            name = f"controlnet_down_blocks.{index}.{leaf}"
        elif key.startswith("middle_block_out.0."):
            name = "controlnet_mid_block." + key.rsplit(".", 1)[1]
        else:
            name = to_diffusers[key]  # a KeyError here means ComfyUI's map changed: fail loudly
        shapes[name] = shape
    model_channels = unet_config["model_channels"]
    shapes["controlnet_cond_embedding.weight"] = torch.Size([model_channels, SPARSECTRL_RGB_HINT_CHANNELS, 3, 3])
    shapes["controlnet_cond_embedding.bias"] = torch.Size([model_channels])
    shapes.update(motion_model_shapes(mid_block=False, up_blocks=False, attention_blocks=1))
    return shapes
