"""UniAnimate as a native ComfyUI MODEL: ComfyUI's sampling (KSampler, every sampler, CFG,
context windows) on the pure-PyTorch UNet of `unianimate/`.

- Sampling: ModelSamplingDiscrete, V_PREDICTION, the official `linear_sd` betas (0.00085 → 0.012,
  1000 steps, √-linear, the formula of ComfyUI's "linear") with zero-terminal-SNR (official §5).
  `ddim_uniform` + `euler` gives exactly the official DDIM's timesteps and update (η = 0).
- Latents are 5-D [B, 4, F, h, w] in the SD latent format (0.18215).
- Conditions travel in the CONDITIONING dict (see `unianimate_conditioning.py`): the positive one
  carries the pose frames (reference pose at frame 0), the reference latent, the CLIP image
  embedding and optionally the local image; the negative one carries zeros of the same shapes,
  marked absent in its presence flags, which the UNet computes as the official unconditional
  branch (every condition None: zeros after the adapters, 4 zero tokens) whatever the tensors
  hold. Both carry `zero_y` as their cross-attention tensor. With equal keys and shapes ComfyUI
  puts the conditional and unconditional samples in one batch (one UNet pass per step instead of
  two); each sample is gated by its own flags, so no sample sees another's conditions. A
  negative from elsewhere (no flags) is never batched with the positive and means None.
- Context windows (core `ContextWindowsManual` on dim 2): every window gets the reference pose
  followed by its own frames' poses, the same reference latent and the same image tokens
  (official `DiffusionDDIMLong`); core's causal anchor frame is removed again before the UNet (the
  official windows have none; the UNet prepends the reference frame itself).
"""
from __future__ import annotations

import einops
import torch

import comfy.conds
import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models_base
from comfy.ldm.modules.attention import optimized_attention

from ..unianimate.config import UniAnimateConfig
from ..unianimate.errors import UniAnimateInputError
from ..unianimate.unet import CONDITIONS, UniAnimateUNet

# keys of the CONDITIONING dict (pack-prefixed: other packs' keys must not collide) ...
POSE_COND = "unianimate_pose"  # [B, 3, F+1, H, W] in 0..1, frame 0 = the reference pose
REFERENCE_COND = "unianimate_reference"  # [B, 4, 1, h, w] reference latent, × 0.18215 applied
IMAGE_COND = "unianimate_clip_image"  # [B, 1, 1024] CLIP ViT-H/14 image_embeds
LOCAL_IMAGE_COND = "unianimate_local_image"  # [B, 3, F, H, W] in 0..1 (official local_image mode)
PRESENT_COND = "unianimate_present"  # [B, 4]: 1 where the sample has the condition (unet.CONDITIONS order)
# ... and the keyword names the model receives them under: the UNet's own names (unet.CONDITIONS)
MODEL_KWARGS = {POSE_COND: "pose", REFERENCE_COND: "reference_latent", IMAGE_COND: "image_embed",
                LOCAL_IMAGE_COND: "local_image", PRESENT_COND: "present"}

SCHEDULE = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000,
            "zsnr": True}  # official configs: linear_sd, zero_terminal_snr True (§5)
FRAME_DIM = 2  # the frame axis of the 5-D latent


class UniAnimateLatent(comfy.latent_formats.SD15):
    """The SD2.1 VAE's latent (0.18215), with frames: [B, 4, F, h, w]."""
    latent_dimensions = 3


def comfy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """ComfyUI's selected attention backend on [B, L, heads·d] (no xformers requirement)."""
    return optimized_attention(q, k, v, heads)


class ComfyUniAnimateUNet(UniAnimateUNet):
    """The UNet under the signature ComfyUI's BaseModel calls; the state-dict keys stay official."""

    def __init__(self, config: UniAnimateConfig, dtype=None, device=None, operations=None, **_):
        super().__init__(config, operations=operations, attention=comfy_attention, dtype=dtype, device=device)
        self.dtype = dtype  # the weight dtype, which BaseModel reads

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                control=None, transformer_options: dict | None = None, pose=None, reference_latent=None,
                image_embed=None, local_image=None, present=None, **_) -> torch.Tensor:
        anchored = _has_causal_anchor(transformer_options or {})
        if anchored:  # drop core's anchor frame (see the module docstring) and give it back as zeros
            x = x[:, :, 1:]
        given = {"pose": pose, "reference_latent": reference_latent, "local_image": local_image,
                 "image_embed": image_embed}
        masks = None if present is None else {
            name: present[:, CONDITIONS.index(name)] > 0.5 for name, value in given.items() if value is not None}
        out = super().forward(x, timesteps, zero_y=context, present=masks, **given)
        if anchored:
            out = torch.cat([torch.zeros_like(out[:, :, :1]), out], dim=2)
        return out


def conditioned_pair(conds: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The positive and negative CONDITIONING dicts for `conds` (condition keys above): the
    positive flags its conditions present; the negative holds zeros of the same shapes flagged
    absent, the official unconditional branch in a form KSampler batches with the positive."""
    names = {MODEL_KWARGS[key] for key in conds}
    flags = torch.tensor([[float(name in names) for name in CONDITIONS]])
    negative = {key: torch.zeros_like(value) for key, value in conds.items()}
    return {**conds, PRESENT_COND: flags}, {**negative, PRESENT_COND: torch.zeros_like(flags)}


def _has_causal_anchor(transformer_options: dict) -> bool:
    window = transformer_options.get("context_window")
    return window is not None and getattr(window, "causal_anchor_index", None) is not None \
        and window.causal_anchor_index >= 0


class UniAnimateModel(comfy.model_base.BaseModel):
    def __init__(self, model_config: "UniAnimateModelConfig", device=None):
        super().__init__(model_config, model_type=comfy.model_base.ModelType.V_PREDICTION, device=device,
                         unet_model=ComfyUniAnimateUNet)

    def extra_conds(self, **kwargs) -> dict:
        _check_pose_matches_latent(kwargs.get(POSE_COND), kwargs.get("noise"))
        out = super().extra_conds(**kwargs)  # c_crossattn = zero_y
        for cond_key, kwarg in MODEL_KWARGS.items():
            value = kwargs.get(cond_key)
            if value is not None:
                out[kwarg] = comfy.conds.CONDRegular(value)
        return out

    def resize_cond_for_context_window(self, cond_key, cond_value, window, x_in, device, retain_index_list=[]):
        """Per window: the reference pose + the window's poses; reference and image tokens whole."""
        if cond_key in ("reference_latent", "image_embed", "present", "c_crossattn"):  # per sample, not per frame
            return cond_value._copy_with(cond_value.cond.to(device))
        if cond_key == "pose":
            frames = [0] + [i + 1 for i in _window_frames(window)]  # pose frame i+1 belongs to latent frame i
            return cond_value._copy_with(cond_value.cond[:, :, frames].to(device))
        if cond_key == "local_image":
            return cond_value._copy_with(cond_value.cond[:, :, _window_frames(window)].to(device))
        return None


def _check_pose_matches_latent(pose: torch.Tensor | None, noise: torch.Tensor | None) -> None:
    """Before sampling starts: the conditioning and the LATENT must describe the same video."""
    if pose is None or noise is None or noise.ndim != 5:
        return
    frames, height, width = noise.shape[2], noise.shape[3] * 8, noise.shape[4] * 8
    if pose.shape[2] != frames + 1 or tuple(pose.shape[3:]) != (height, width):
        raise UniAnimateInputError(
            f"UniAnimate: the conditioning holds {pose.shape[2] - 1} pose frames of {pose.shape[4]}×{pose.shape[3]} "
            f"px but the latent has {frames} frames of {width}×{height} px. Sample the LATENT that the same "
            "UniAnimateConditioning made (its frame count and size follow the pose frames).")


def _window_frames(window) -> list[int]:
    """The window's latent frames, without core's causal anchor (the UNet drops that frame)."""
    return list(window.index_list)


class UniAnimateModelConfig(comfy.supported_models_base.BASE):
    """What ComfyUI needs to build, sample and manage the model; the architecture is `config`."""
    sampling_settings = SCHEDULE
    latent_format = UniAnimateLatent
    memory_usage_factor = 2.0
    supported_inference_dtypes = [torch.float16, torch.bfloat16, torch.float32]

    def __init__(self, config: UniAnimateConfig):
        super().__init__({"config": config})

    def get_model(self, state_dict, prefix: str = "", device=None) -> UniAnimateModel:
        return UniAnimateModel(self, device=device)


def build_model(state: dict[str, torch.Tensor], config: UniAnimateConfig,
                weight_dtype: torch.dtype | None = None):
    """A ModelPatcher around a UniAnimateModel holding `state` (already checked: every key and shape).

    `weight_dtype` None = ComfyUI's choice for this device; the compute dtype is ComfyUI's manual
    cast where the device cannot compute in the weight dtype (e.g. fp16 weights on a CPU)."""
    mm = comfy.model_management
    model_config = UniAnimateModelConfig(config)
    load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
    supported = model_config.supported_inference_dtypes
    if weight_dtype is None:
        parameters = sum(t.numel() for t in state.values())
        weight_dtype = mm.unet_dtype(model_params=parameters, supported_dtypes=supported)
    model_config.set_inference_dtype(weight_dtype, mm.unet_manual_cast(weight_dtype, load_device, supported),
                                     device=load_device)
    model = model_config.get_model(state)
    patcher = comfy.model_patcher.CoreModelPatcher(model, load_device=load_device, offload_device=offload_device)
    if not mm.is_device_cpu(offload_device):
        model.to(offload_device)
    model.load_model_weights(dict(state), "", assign=patcher.is_dynamic())
    return patcher


def frames_to_batch(samples: torch.Tensor) -> torch.Tensor:
    """[B, 4, F, h, w] → [B·F, 4, h, w], what VAEDecode of the SD2.1 VAE decodes frame by frame."""
    return einops.rearrange(samples, "b c f h w -> (b f) c h w")
