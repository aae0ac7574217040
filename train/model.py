"""The trainable face adapter: Resampler, 16 face K/V projections and the attn2 LoRAs (paper §3.2).

`FaceAdapter` is one `torch.nn.Module` whose children are named as in the official code
(`image_proj_model`, `adapter_modules`), so its `state_dict()` keys are exactly the keys of
`animator.ckpt` (official §3.1 container 1), and under DDP they gain only the `module.` prefix
the official loader strips. The frozen UNet is never a child: the adapter drives it through
diffusers attention processors installed on its 16 spatial attn2 layers (by module name,
`adapter/layer_map.py`), so freezing, casting or saving the UNet never touches the adapter.

The processors compute the official training maths (§6): unmerged, unscaled LoRAs
(`W x + up(down(x))`) and the decoupled attention shared with inference
(`adapter/face_attention.py`), whose out-of-place path autograd takes.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..adapter.checkpoint import (
    ADAPTER_WIDTHS, LORA_RANK, AdapterWeights, adapter_layer_shapes, flat_adapter_key, flat_shapes,
    official_state_dict, parse_adapter_state, resampler_shapes)
from ..adapter.errors import CheckpointError, TrainingError
from ..adapter.face_attention import decoupled_attention
from ..adapter.layer_map import LAYERS, LORA_TARGETS, TEXT_CONTEXT_DIM
from ..adapter.resampler import Resampler, ResamplerConfig
from ..adapter.weights_file import read_state_dict

ADAPTER_SLOTS = 2 * len(LAYERS)  # official adapter list: attn1 (even) and attn2 (odd) of 16 blocks


@dataclass(frozen=True)
class AdapterConfig:
    """Adapter shapes: attn2 width per official odd index, context width, LoRA rank, Resampler.

    `sd15()` is the released animator.ckpt; `from_unet` reads the widths off any UNet with
    SD1.5's block layout (e.g. the tiny test UNet), so one code path trains both.
    """

    widths: Mapping[int, int] = field(default_factory=lambda: dict(ADAPTER_WIDTHS))
    context_dim: int = TEXT_CONTEXT_DIM
    rank: int = LORA_RANK
    resampler: ResamplerConfig = ResamplerConfig()

    def __post_init__(self) -> None:
        indices = {layer.official_index for layer in LAYERS}
        if set(self.widths) != indices:
            raise TrainingError(f"Adapter widths must be given for the 16 official attn2 indices "
                                f"{sorted(indices)}, got {sorted(self.widths)}.")
        if self.resampler.output_dim != self.context_dim:
            raise TrainingError(
                f"The Resampler's output width ({self.resampler.output_dim}) must equal the UNet's "
                f"cross-attention width ({self.context_dim}): face tokens sit beside text tokens.")
        if min(self.widths.values()) <= 0 or self.rank <= 0:
            raise TrainingError(f"Adapter widths and LoRA rank must be positive: {self}.")

    @classmethod
    def sd15(cls) -> AdapterConfig:
        """The official SD1.5 adapter (§3): 61.8 M parameters in 211 tensors."""
        return cls()

    @classmethod
    def from_unet(cls, unet: torch.nn.Module, *, rank: int = LORA_RANK,
                  resampler: ResamplerConfig | None = None) -> AdapterConfig:
        """Widths from each attn2 `to_q` (found by module name) and the context width from `to_k`."""
        widths: dict[int, int] = {}
        contexts: set[int] = set()
        for layer in LAYERS:
            attn = _attn2(unet, layer.diffusers_module)
            if attn.to_q.in_features != attn.to_q.out_features:
                raise TrainingError(
                    f"{layer.diffusers_module}: to_q maps {attn.to_q.in_features} -> "
                    f"{attn.to_q.out_features} channels; the ID-Animator adapter needs a square "
                    f"to_q (as in SD1.5).")
            widths[layer.official_index] = attn.to_q.out_features
            contexts.add(attn.to_k.in_features)
        if len(contexts) != 1:
            raise TrainingError(f"The UNet's attn2 layers take contexts of different widths "
                                f"{sorted(contexts)}; expected one cross_attention_dim.")
        context_dim = contexts.pop()
        if resampler is None:
            resampler = ResamplerConfig(output_dim=context_dim)
        return cls(widths=widths, context_dim=context_dim, rank=rank, resampler=resampler)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> AdapterConfig:
        """The shapes of an adapter state dict (official, flat or accelerate keys): the Resampler's
        head split is not visible in shapes, so heads x dim_head is read as n x 64 where it can be."""
        flat = {}
        for key, value in state.items():
            name = flat_adapter_key(str(key))
            if name is not None and isinstance(value, Tensor):
                flat[name] = value
        try:
            latents, proj_in = flat["image_proj.latents"], flat["image_proj.proj_in.weight"]
            inner = flat["image_proj.layers.0.0.to_q.weight"].shape[0]
            ff = flat["image_proj.layers.0.1.1.weight"].shape[0]
            depth = 1 + max(int(k.split(".")[2]) for k in flat if k.startswith("image_proj.layers."))
            widths = {layer.official_index: flat[f"face_adapter.{layer.official_index}.to_k_face.weight"].shape[0]
                      for layer in LAYERS}
            first = flat[f"face_adapter.{LAYERS[0].official_index}.to_k_face.weight"]
            rank = flat[f"face_adapter.{LAYERS[0].official_index}.to_q_lora.down.weight"].shape[0]
            output_dim = flat["image_proj.proj_out.weight"].shape[0]
        except (KeyError, IndexError, ValueError) as error:
            raise CheckpointError(f"Not an ID-Animator adapter state: {error} is missing.") from error
        dim_head = 64 if inner % 64 == 0 else inner
        resampler = ResamplerConfig(dim=latents.shape[2], depth=depth, dim_head=dim_head,
                                    heads=inner // dim_head, num_queries=latents.shape[1],
                                    embedding_dim=proj_in.shape[1], output_dim=output_dim,
                                    ff_mult=ff // latents.shape[2])
        return cls(widths=widths, context_dim=first.shape[1], rank=rank, resampler=resampler)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Flat tensor names -> shapes: the table `adapter.checkpoint` readers take as `expected`."""
        return flat_shapes(
            resampler_shapes(self.resampler),
            {i: adapter_layer_shapes(w, self.context_dim, self.rank) for i, w in self.widths.items()})

    @property
    def is_sd15(self) -> bool:
        """True when the shapes are those of the released SD1.5 file (what LoadIDAnimator reads)."""
        return self.shapes == AdapterConfig.sd15().shapes


def _attn2(unet: torch.nn.Module, name: str) -> Any:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise TrainingError(
            f"The UNet has no module {name}: the adapter needs SD1.5's block layout (diffusers "
            f"UNet2DConditionModel or UNetMotionModel).") from None


class LoRALinear(torch.nn.Module):
    """up(down(x)), unscaled (official §3.3; diffusers LoRALinearLayer with network_alpha None)."""

    def __init__(self, in_features: int, out_features: int, rank: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=False)
        # diffusers/official init: the update starts at exactly zero, down is not degenerate
        torch.nn.init.normal_(self.down.weight, std=1 / rank)
        torch.nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        # computed in the LoRA's dtype and returned in x's, like diffusers (frozen bf16 UNet)
        return self.up(self.down(x.to(self.down.weight.dtype))).to(x.dtype)


class SelfAttentionSlot(torch.nn.Module):
    """An even (attn1) entry of the official adapter list: no weights, never installed."""


class FaceAttnProcessor(torch.nn.Module):
    """One attn2 layer's face branch and LoRAs, run as a diffusers attention processor (§6).

    The last `num_tokens` context tokens are the face tokens (official split); the rest is text.
    q/k/v/out get their unmerged LoRA; the face K/V attend with the same query; the output is
    text_out + λ·face_out through the shared `decoupled_attention`.
    """

    def __init__(self, width: int, context_dim: int, rank: int, num_tokens: int,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.num_tokens = num_tokens
        self.scale = scale
        self.to_k_face = torch.nn.Linear(context_dim, width, bias=False)
        self.to_v_face = torch.nn.Linear(context_dim, width, bias=False)
        self.to_q_lora = LoRALinear(width, width, rank)
        self.to_k_lora = LoRALinear(context_dim, width, rank)
        self.to_v_lora = LoRALinear(context_dim, width, rank)
        self.to_out_lora = LoRALinear(width, width, rank)

    def forward(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, temb: Tensor | None = None,
                *args: Any, **kwargs: Any) -> Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_tokens:
            raise TrainingError(
                f"The face processor needs a context of text tokens followed by {self.num_tokens} "
                f"face tokens, got {None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)}; "
                f"build it with FaceAdapter.encoder_hidden_states.")
        if attention_mask is not None:
            raise TrainingError("The face processor takes no attention mask (the official maths has none).")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            # (B, C, H, W) -> (B, H*W, C)
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        text, face = encoder_hidden_states[:, :-self.num_tokens], encoder_hidden_states[:, -self.num_tokens:]
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        q = attn.to_q(hidden_states) + self.to_q_lora(hidden_states)
        k = attn.to_k(text) + self.to_k_lora(text)
        v = attn.to_v(text) + self.to_v_lora(text)
        face = face.to(self.to_k_face.weight.dtype)
        out = decoupled_attention(q, k, v, self.to_k_face(face), self.to_v_face(face), self.scale,
                                  attn.heads)
        out = attn.to_out[0](out) + self.to_out_lora(out)
        out = attn.to_out[1](out)  # dropout

        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _Installed:
    """What sits in `Attention.processor`: a plain callable forwarding to the adapter's module.

    diffusers registers an nn.Module processor as a child of the attention layer; the adapter's
    tensors would then become UNet parameters (frozen by `unet.requires_grad_(False)`, cast by
    `unet.to(dtype)`, saved with the UNet). This indirection keeps them the adapter's alone.
    """

    def __init__(self, processor: FaceAttnProcessor) -> None:
        self.processor = processor

    def __call__(self, attn: Any, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, temb: Tensor | None = None) -> Tensor:
        return self.processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


class FaceAdapter(torch.nn.Module):
    """The trainable part of ID-Animator; `state_dict()` keys = official animator.ckpt keys."""

    def __init__(self, config: AdapterConfig | None = None, *, train_lora: bool = True,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.config = AdapterConfig.sd15() if config is None else config
        self.image_proj_model = Resampler(self.config.resampler)
        self.adapter_modules = torch.nn.ModuleList(
            FaceAttnProcessor(self.config.widths[i], self.config.context_dim, self.config.rank,
                              self.config.resampler.num_queries, scale)
            if i in self.config.widths else SelfAttentionSlot()
            for i in range(ADAPTER_SLOTS))
        self.set_train_lora(train_lora)

    # -- parts --------------------------------------------------------------------------------

    def face_processors(self) -> dict[int, FaceAttnProcessor]:
        """Official odd index -> that attn2 layer's processor."""
        return {layer.official_index: self.adapter_modules[layer.official_index] for layer in LAYERS}

    def lora_modules(self) -> Iterator[LoRALinear]:
        for processor in self.face_processors().values():
            for target in LORA_TARGETS:
                yield getattr(processor, f"{target}_lora")

    @property
    def train_lora(self) -> bool:
        return self._train_lora

    def set_train_lora(self, train: bool) -> None:
        """Train the LoRAs, or freeze them (the paper's text trains K/V + Resampler only); frozen
        LoRAs keep their values (zero from scratch or IP-Adapter) and are still exported."""
        self._train_lora = train
        for lora in self.lora_modules():
            lora.requires_grad_(train)

    def set_scale(self, scale: float) -> None:
        """λ of every layer (1.0 in training, as in the official code's default)."""
        for processor in self.face_processors().values():
            processor.scale = scale

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer holds: every tensor of the adapter that requires a gradient."""
        return [p for p in self.parameters() if p.requires_grad]

    # -- forward ------------------------------------------------------------------------------

    def face_tokens(self, clip_penultimate: Tensor) -> Tensor:
        """CLIP ViT-H penultimate states (B, 257, 1280) -> face tokens (B, num_queries, context)."""
        return self.image_proj_model(clip_penultimate.to(self.image_proj_model.latents.dtype))

    @staticmethod
    def encoder_hidden_states(text: Tensor, face_tokens: Tensor, frames: int) -> Tensor:
        """[text ‖ face] per frame: (B·F, 77 + Q, D). UNetMotionModel does not repeat the context
        per frame; its rows are batch-major, frames inner. `text` is (B·F, 77, D) or (B, 77, D)."""
        batch = face_tokens.shape[0]
        if text.shape[0] == batch and frames > 1:
            text = text.repeat_interleave(frames, dim=0)
        if text.shape[0] != batch * frames:
            raise TrainingError(f"Text embeddings for {text.shape[0]} rows do not fit {batch} clips "
                                f"of {frames} frames; expected {batch} or {batch * frames} rows.")
        faces = face_tokens.to(text.dtype).repeat_interleave(frames, dim=0)
        return torch.cat((text, faces), dim=1)

    def forward(self, unet: torch.nn.Module, sample: Tensor, timestep: Tensor, text: Tensor,
                clip_penultimate: Tensor, **unet_kwargs: Any) -> Tensor:
        """ε prediction of the (installed) UNet for latents (B, C, F, H, W).

        Going through the adapter's own forward lets DDP (`accelerator.prepare(adapter)`) see the
        step and all-reduce the adapter's gradients; the UNet is an argument, not a child."""
        context = self.encoder_hidden_states(text, self.face_tokens(clip_penultimate), sample.shape[2])
        return unet(sample, timestep, encoder_hidden_states=context, **unet_kwargs).sample

    # -- UNet ---------------------------------------------------------------------------------

    def install(self, unet: torch.nn.Module) -> None:
        """Set the 16 attn2 processors by module name; every other processor is left as is."""
        for layer in LAYERS:
            attn = _attn2(unet, layer.diffusers_module)
            width = self.config.widths[layer.official_index]
            if attn.to_q.out_features != width or attn.to_k.in_features != self.config.context_dim:
                raise TrainingError(
                    f"{layer.diffusers_module} is {attn.to_q.out_features} wide with a "
                    f"{attn.to_k.in_features}-wide context, but the adapter was made for {width} and "
                    f"{self.config.context_dim}: build its config with AdapterConfig.from_unet.")
            attn.set_processor(_Installed(self.adapter_modules[layer.official_index]))

    @staticmethod
    def uninstall(unet: torch.nn.Module) -> None:
        """Give the 16 attn2 layers diffusers' plain processor back."""
        from diffusers.models.attention_processor import AttnProcessor2_0

        for layer in LAYERS:
            _attn2(unet, layer.diffusers_module).set_processor(AttnProcessor2_0())

    # -- weights ------------------------------------------------------------------------------

    def to_weights(self) -> AdapterWeights:
        """A detached copy of every tensor under its official name."""
        resampler: dict[str, Tensor] = {}
        layers: dict[int, dict[str, Tensor]] = {i: {} for i in self.config.widths}
        for key, tensor in self.state_dict().items():
            name = flat_adapter_key(key)
            group, _, rest = name.partition(".")
            if group == "image_proj":
                resampler[rest] = tensor.detach().clone()
            else:
                index, _, param = rest.partition(".")
                layers[int(index)][param] = tensor.detach().clone()
        return AdapterWeights(resampler=resampler, layers=layers)

    def load_weights(self, weights: AdapterWeights, source: str = "<weights>") -> None:
        """Copy validated weights in (shapes checked against the config, names strict)."""
        flat = official_state_dict(weights, "flat")
        checked = parse_adapter_state(flat, source, expected=self.config.shapes)
        self.load_state_dict(official_state_dict(checked, "state_dict")["state_dict"], strict=True)

    @classmethod
    def from_weights(cls, weights: AdapterWeights, config: AdapterConfig | None = None, *,
                     train_lora: bool = True, scale: float = 1.0) -> FaceAdapter:
        """A trainable adapter holding `weights` (config read off their shapes when None)."""
        if config is None:
            config = AdapterConfig.from_state_dict(official_state_dict(weights, "flat"))
        adapter = cls(config, train_lora=train_lora, scale=scale)
        adapter.load_weights(weights)
        return adapter


# ---------------------------------------------------------------------------------------------
# Initialisation: scratch, an existing animator.ckpt, or IP-Adapter-Plus SD1.5


def initial_adapter(config: AdapterConfig, init: str | Path, seed: int, *,
                    unet: torch.nn.Module | None = None, train_lora: bool = True) -> FaceAdapter:
    """The adapter training starts from.

    - "scratch": seeded random Resampler and LoRA down, LoRA up zero; face K/V copied from the
      UNet's attn2 to_k/to_v when `unet` is given (IP-Adapter's training practice), else random;
    - a path to an animator.ckpt (any layout `load_adapter_checkpoint` reads): fine-tuning;
    - a path to an IP-Adapter-Plus SD1.5 file (face or general, .bin/.safetensors): the paper's
      start; image_proj -> Resampler, ip_adapter.<i>.to_k_ip/to_v_ip -> to_k_face/to_v_face at the
      same odd index, LoRAs as from scratch (up zero, so step 0 is IP-Adapter-Plus exactly).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = FaceAdapter(config, train_lora=train_lora)
    if str(init) == "scratch":
        if unet is not None:
            with torch.no_grad():
                for layer in LAYERS:
                    attn = _attn2(unet, layer.diffusers_module)
                    processor = adapter.adapter_modules[layer.official_index]
                    processor.to_k_face.weight.copy_(attn.to_k.weight)
                    processor.to_v_face.weight.copy_(attn.to_v.weight)
        return adapter
    path = Path(init)
    if not path.is_file():
        raise TrainingError(f"--init {init}: no such file. Give 'scratch', an animator.ckpt to "
                            f"fine-tune, or an IP-Adapter-Plus SD1.5 file (ip-adapter-plus(-face)_sd15).")
    state = read_state_dict(path)
    parts = _ip_adapter_parts(state)
    if parts is not None:
        _load_ip_adapter_plus(adapter, *parts, source=str(path))
    else:
        adapter.load_weights(parse_adapter_state(state, str(path), expected=config.shapes))
        adapter.set_train_lora(train_lora)
    return adapter


def _ip_adapter_parts(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(image_proj, ip_adapter) of an IP-Adapter file: nested (.bin) or flat-prefixed (.safetensors)."""
    image_proj, ip_adapter = state.get("image_proj"), state.get("ip_adapter")
    if isinstance(image_proj, Mapping) and isinstance(ip_adapter, Mapping):
        return dict(image_proj), dict(ip_adapter)
    if not any(str(k).startswith("ip_adapter.") for k in state):
        return None
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in state.items():
        group, _, rest = str(key).partition(".")
        nested.setdefault(group, {})[rest] = value
    return nested["image_proj"], nested["ip_adapter"]


def _load_ip_adapter_plus(adapter: FaceAdapter, image_proj: dict[str, Any], ip_adapter: dict[str, Any],
                          source: str) -> None:
    """Copy an IP-Adapter-Plus file's Resampler and image K/V in; refuse any other IP-Adapter."""
    if any("lora" in k for k in ip_adapter) or "latents" not in image_proj:
        kind = ("an IP-Adapter FaceID file" if any("lora" in k for k in ip_adapter)
                else "a plain or full-face IP-Adapter file (no Resampler latents)")
        raise TrainingError(f"{source} is {kind}; ID-Animator starts from IP-Adapter-Plus "
                            f"(ip-adapter-plus_sd15 or ip-adapter-plus-face_sd15), whose image_proj "
                            f"is the same Resampler.")
    config = adapter.config
    expected = {f"image_proj.{k}": s for k, s in resampler_shapes(config.resampler).items()}
    for index, width in config.widths.items():
        for name in ("to_k_ip.weight", "to_v_ip.weight"):
            expected[f"ip_adapter.{index}.{name}"] = (width, config.context_dim)
    found = {f"image_proj.{k}": v for k, v in image_proj.items()}
    found.update({f"ip_adapter.{k}": v for k, v in ip_adapter.items()})
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: {tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}, expected {expected[k]}"
                 for k, v in found.items()
                 if k in expected and not (isinstance(v, Tensor) and v.is_floating_point()
                                           and tuple(v.shape) == expected[k])]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise TrainingError(
            f"{source} does not fit this adapter as an IP-Adapter-Plus file ({shown}). ID-Animator "
            f"trains from IP-Adapter-Plus for SD1.5 (ViT-H image encoder, 16 queries); an SDXL or "
            f"ViT-bigG file has other shapes.")
    with torch.no_grad():
        adapter.image_proj_model.load_state_dict(
            {k: v.float() for k, v in image_proj.items()}, strict=True)
        for index in config.widths:
            processor = adapter.adapter_modules[index]
            processor.to_k_face.weight.copy_(ip_adapter[f"{index}.to_k_ip.weight"])
            processor.to_v_face.weight.copy_(ip_adapter[f"{index}.to_v_ip.weight"])
