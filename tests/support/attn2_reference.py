"""What the pack should compute in ComfyUI's cross-attention, written from the spec (official §3.4
and §6) and ComfyUI's own API, never from the pack's code: the layer table, the adapter file read
directly, multi-head attention written out, and hooks that record what a real sampling run does."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import Tensor

# official adapter index -> (LDM block of its attn2, ComfyUI attn2 patch key), official §3.4
SPEC_LAYERS: dict[int, tuple[str, tuple[str, int]]] = {
    1: ("input_blocks.1.1", ("input", 1)), 3: ("input_blocks.2.1", ("input", 2)),
    5: ("input_blocks.4.1", ("input", 4)), 7: ("input_blocks.5.1", ("input", 5)),
    9: ("input_blocks.7.1", ("input", 7)), 11: ("input_blocks.8.1", ("input", 8)),
    13: ("output_blocks.3.1", ("output", 3)), 15: ("output_blocks.4.1", ("output", 4)),
    17: ("output_blocks.5.1", ("output", 5)), 19: ("output_blocks.6.1", ("output", 6)),
    21: ("output_blocks.7.1", ("output", 7)), 23: ("output_blocks.8.1", ("output", 8)),
    25: ("output_blocks.9.1", ("output", 9)), 27: ("output_blocks.10.1", ("output", 10)),
    29: ("output_blocks.11.1", ("output", 11)), 31: ("middle_block.1", ("middle", 0)),
}
INDEX_OF_KEY = {key: index for index, (_, key) in SPEC_LAYERS.items()}
LORA_MODULES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}  # LoRA name -> attn2 module


LORA_WEIGHTS = [(index, target) for index in SPEC_LAYERS for target in LORA_MODULES]  # the 64 patched


def attn2_weight_name(index: int, target: str) -> str:
    """Name of a LoRA-patched attn2 weight in a diffusion model file (no `diffusion_model.` prefix)."""
    return f"{SPEC_LAYERS[index][0]}.transformer_blocks.0.attn2.{LORA_MODULES[target]}.weight"


MODEL_NAMES = [f"diffusion_model.{attn2_weight_name(i, t)}" for i, t in LORA_WEIGHTS]  # in the live model


def adapter_tensors(path: Path) -> dict[int, dict[str, Tensor]]:
    """animator.ckpt's adapter tensors (official `state_dict` container), fp32, by official index."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    layers: dict[int, dict[str, Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith("adapter_modules."):
            index, rest = name.removeprefix("adapter_modules.").split(".", 1)
            layers.setdefault(int(index), {})[rest] = tensor.float()
    return layers


def base_attn2_weights(unet_file: Path) -> dict[str, Tensor]:
    """The 64 LoRA-patched weights as stored in the UNet file, by live-model name."""
    with safe_open(str(unet_file), "pt") as f:
        return {name: f.get_tensor(name.removeprefix("diffusion_model.")) for name in MODEL_NAMES}


def lora_deltas(layers: dict[int, dict[str, Tensor]]) -> dict[str, Tensor]:
    """up @ down (fp32) of each of the 64 LoRAs, by live-model name (official §3.3: no alpha)."""
    return {name: layers[i][f"{t}_lora.up.weight"] @ layers[i][f"{t}_lora.down.weight"]
            for name, (i, t) in zip(MODEL_NAMES, LORA_WEIGHTS)}


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q kᵀ / sqrt(d)) v per head, in fp32; (B, L, heads*d) in and out."""
    batch, width = q.shape[0], q.shape[-1]
    d = width // heads
    split = lambda x: x.float().reshape(batch, -1, heads, d).transpose(1, 2)  # noqa: E731 (B,H,L,d)
    weights = (split(q) @ split(k).transpose(-2, -1) * d ** -0.5).softmax(dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(batch, -1, width)


def rows_of_tokens(cond: Tensor, uncond: Tensor, cond_or_uncond: Sequence[int], frames: int) -> Tensor:
    """Face tokens for each batch row: ComfyUI stacks one chunk of `frames` rows per entry of
    cond_or_uncond (0 = cond, 1 = uncond). cond (1 or frames, 16, 768); uncond (16, 768)."""
    chunks = {0: cond.expand(frames, -1, -1), 1: uncond.expand(frames, -1, -1)}
    return torch.cat([chunks[c] for c in cond_or_uncond])


def face_branch(call: dict, tensors: dict[str, Tensor], cond_tokens: Tensor, uncond_tokens: Tensor) -> Tensor:
    """Attention of the call's query over its layer's face keys/values (official §6 step 5)."""
    frames = call["q"].shape[0] // len(call["cond_or_uncond"])
    tokens = rows_of_tokens(cond_tokens.float(), uncond_tokens.float(), call["cond_or_uncond"], frames)
    keys, values = tokens @ tensors["to_k_face.weight"].T, tokens @ tensors["to_v_face.weight"].T
    return attention(call["q"], keys, values, call["heads"])


def text_branch(call: dict) -> Tensor:
    return attention(call["q"], call["k"], call["v"], call["heads"])


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


class Recorder:
    """Wraps a registered attn2 patch and keeps what each call got and returned. `.to` wraps the
    moved patch, so ComfyUI's device and dtype moves reach the patch under test."""

    def __init__(self, patch, key, calls: list):
        self.patch, self.key, self.calls = patch, key, calls

    def __call__(self, q, k, v, extra_options):
        out = self.patch(q, k, v, extra_options)
        self.calls.append({"key": self.key, "q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone(),
                           "cond_or_uncond": list(extra_options["cond_or_uncond"]),
                           "heads": extra_options["n_heads"], "sigma": float(extra_options["sigmas"].flatten()[0]),
                           "original_shape": list(extra_options["original_shape"])})
        return out

    def to(self, device_or_dtype):
        moved = self.patch.to(device_or_dtype) if hasattr(self.patch, "to") else self.patch
        return Recorder(moved, self.key, self.calls)


def recording(model, calls: list):
    """A clone of `model` whose every attn2 replace patch is wrapped in a Recorder."""
    patched = model.clone()
    for key, patch in patched.model_options["transformer_options"]["patches_replace"]["attn2"].items():
        patched.set_model_attn2_replace(Recorder(patch, key, calls), *key)
    return patched


def capturing_weights(model, names: Sequence[str], captured: list):
    """A clone of `model` that copies the named weights of the live model at every UNet call, i.e.
    the weights ComfyUI really samples with (its LoRA patches merged)."""
    patched = model.clone()

    def wrapper(apply_model, args):
        state = patched.model.state_dict()
        captured.append({name: state[name].detach().clone() for name in names})
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(wrapper)
    return patched


def text_conditioning(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen), {}]]


def sample(comfy, model, frames: int = 1, steps: int = 1, cfg: float = 2.0, height: int = 64, width: int = 64):
    """One real KSampler run (euler, normal) from a zero latent; returns the sampled latent."""
    latent = {"samples": torch.zeros(frames, 4, height // 8, width // 8)}
    return comfy.nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", text_conditioning(1),
                                       text_conditioning(2), latent)[0]["samples"]
