"""The ID-Animator adapter file's schema (`animator.ckpt`, official §3): names, shapes, checks.

The file holds the Resampler (`image_proj`, 51 tensors) and the 16 attn2 adapter modules
(`face_adapter`, odd indices 1..31, 10 tensors each). Every key, shape and dtype is checked;
a wrong file gets a message naming what it is (IP-Adapter, SDXL, motion module...).

Reading, naming a wrong file, the key rule and verified writes are `weights_file`'s, shared with
the trainer and the other model families; this module adds only what is ID-Animator's.
"""
from __future__ import annotations

import contextlib

import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .layer_map import LAYERS, TEXT_CONTEXT_DIM
from .resampler import ResamplerConfig
from .weights_file import (
    canonical_key, expect_kind, identify, read_state_dict, what_it_is,
    write_verified,
)

logger = logging.getLogger(__name__)

EXPECTED_FILE = ("Expected animator.ckpt from the ID-Animator Hugging Face Space "
                 "(huggingface.co/spaces/ID-Animator/ID-Animator), placed in models/id_animator/.")
CLIP_VISION_WANTED = ("the CLIP ViT-H/14 image encoder ID-Animator was trained on (OpenCLIP ViT-H/14, width "
                      "1280, 32 layers, 224 px: CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors, the IP-Adapter "
                      "SD1.5 image encoder, in models/clip_vision/)")
SAFETENSORS_FORMAT = "id-animator"  # metadata "format" of the files save_adapter_safetensors writes

LORA_RANK = 128  # official §3.3: rank-128 LoRA on attn2 q/k/v/out
ADAPTER_WIDTHS: dict[int, int] = {layer.official_index: layer.channels for layer in LAYERS}  # §3.4


def resampler_shapes(config: ResamplerConfig = ResamplerConfig()) -> dict[str, tuple[int, ...]]:
    """The `image_proj` tensors of a Resampler; the default config gives official §3.2's 51
    tensors (29,918,208 parameters)."""
    d, inner, ff = config.dim, config.dim_head * config.heads, config.dim * config.ff_mult
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, config.num_queries, d),
        "proj_in.weight": (d, config.embedding_dim), "proj_in.bias": (d,),
        "proj_out.weight": (config.output_dim, d), "proj_out.bias": (config.output_dim,),
        "norm_out.weight": (config.output_dim,), "norm_out.bias": (config.output_dim,),
    }
    for layer in range(config.depth):
        attn, ffn = f"layers.{layer}.0", f"layers.{layer}.1"
        shapes.update({
            f"{attn}.norm1.weight": (d,), f"{attn}.norm1.bias": (d,),
            f"{attn}.norm2.weight": (d,), f"{attn}.norm2.bias": (d,),
            f"{attn}.to_q.weight": (inner, d),
            f"{attn}.to_kv.weight": (2 * inner, d),  # rows: K then V
            f"{attn}.to_out.weight": (d, inner),
            f"{ffn}.0.weight": (d,), f"{ffn}.0.bias": (d,),  # FF LayerNorm
            f"{ffn}.1.weight": (ff, d),
            f"{ffn}.3.weight": (d, ff),
        })
    return shapes


def adapter_layer_shapes(width: int, context_dim: int = TEXT_CONTEXT_DIM,
                         rank: int = LORA_RANK) -> dict[str, tuple[int, ...]]:
    """The 10 tensors of one attn2 adapter module with hidden size `width` (official §3.3)."""
    ctx, r = context_dim, rank
    return {
        "to_k_face.weight": (width, ctx), "to_v_face.weight": (width, ctx),
        "to_q_lora.down.weight": (r, width), "to_q_lora.up.weight": (width, r),
        "to_k_lora.down.weight": (r, ctx), "to_k_lora.up.weight": (width, r),
        "to_v_lora.down.weight": (r, ctx), "to_v_lora.up.weight": (width, r),
        "to_out_lora.down.weight": (r, width), "to_out_lora.up.weight": (width, r),
    }


def flat_shapes(resampler: Mapping[str, tuple[int, ...]],
                layers: Mapping[int, Mapping[str, tuple[int, ...]]]) -> dict[str, tuple[int, ...]]:
    """Canonical (flat) names -> shapes: image_proj.<k>, face_adapter.<i>.<k>."""
    return {**{f"image_proj.{key}": shape for key, shape in resampler.items()},
            **{f"face_adapter.{index}.{key}": shape
               for index, layer in layers.items() for key, shape in layer.items()}}


RESAMPLER_SHAPES = resampler_shapes()
ADAPTER_SHAPES: dict[int, dict[str, tuple[int, ...]]] = {
    index: adapter_layer_shapes(width) for index, width in ADAPTER_WIDTHS.items()}
# Canonical (flat) names: the layout save_adapter_safetensors writes. SD1.5, the loader's default;
# `expected=` of the readers below takes another table of the same form (see flat_shapes).
EXPECTED_SHAPES: dict[str, tuple[int, ...]] = flat_shapes(RESAMPLER_SHAPES, ADAPTER_SHAPES)


def _split_expected(expected: Mapping[str, tuple[int, ...]]) -> tuple[list[str], dict[int, list[str]]]:
    """(resampler keys, index -> layer keys) of a flat shape table, in its order."""
    resampler: list[str] = []
    layers: dict[int, list[str]] = {}
    for name in expected:
        group, _, key = name.partition(".")
        if group == "image_proj":
            resampler.append(key)
        else:
            index, _, param = key.partition(".")
            layers.setdefault(int(index), []).append(param)
    return resampler, layers


@dataclass(frozen=True)
class AdapterWeights:
    """Validated animator.ckpt tensors under their official names."""

    resampler: dict[str, torch.Tensor]  # the 51 image_proj tensors: latents, proj_in.weight, ...
    layers: dict[int, dict[str, torch.Tensor]]  # odd index 1..31 -> to_k_face.weight, to_q_lora.down.weight, ...

    def tensors(self) -> Iterator[torch.Tensor]:
        yield from self.resampler.values()
        for layer in self.layers.values():
            yield from layer.values()

    @property
    def tensor_count(self) -> int:
        return sum(1 for _ in self.tensors())

    @property
    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.tensors())

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> AdapterWeights:
        """A copy with every tensor cast/moved (the same tensors where nothing changes)."""
        return AdapterWeights(
            resampler={k: t.to(device=device, dtype=dtype) for k, t in self.resampler.items()},
            layers={i: {k: t.to(device=device, dtype=dtype) for k, t in layer.items()}
                    for i, layer in self.layers.items()})


# ---------------------------------------------------------------------------------------------
# Validating the content


def _canonical_key(key: object, expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> str | None:
    """The flat name (image_proj.<k> / face_adapter.<i>.<k>) of an official key, else None."""
    return flat_adapter_key(key) if flat_adapter_key(key) in expected else None


def flat_adapter_key(key: object) -> str | None:
    """image_proj.<k> / face_adapter.<i>.<k> for official (§3.1), accelerate, torch.compile'd or
    flat keys, else None; the wrappers go by the pack's one key rule (`canonical_key`)."""
    if not isinstance(key, str):
        return None
    key = canonical_key(key)
    for prefix, flat in (("image_proj_model.", "image_proj."), ("adapter_modules.", "face_adapter."),
                         ("image_proj.", "image_proj."), ("face_adapter.", "face_adapter.")):
        if key.startswith(prefix):
            return flat + key[len(prefix):]
    return None


def _key_text(key: object) -> str:
    return key if isinstance(key, str) else repr(key)


def _entries(state: Mapping[Any, Any]) -> tuple[list[tuple[str, Any]], str]:
    """(key, value) pairs under flat names, and the container seen (official §3.1 + ours)."""
    inner = state.get("state_dict")
    if isinstance(inner, Mapping):  # official container 1; other top-level entries are ignored
        return [(_key_text(k), v) for k, v in inner.items()], "state_dict"
    image_proj, face_adapter = state.get("image_proj"), state.get("face_adapter")
    if isinstance(image_proj, Mapping) or isinstance(face_adapter, Mapping):  # official container 2
        # one of the two alone is still this container, so the message lists the other as missing
        image_proj = image_proj if isinstance(image_proj, Mapping) else {}
        face_adapter = face_adapter if isinstance(face_adapter, Mapping) else {}
        pairs = [(f"image_proj.{k}", v) for k, v in image_proj.items()]
        pairs += [(f"face_adapter.{k}", v) for k, v in face_adapter.items()]
        return pairs, "image_proj+face_adapter"
    return [(_key_text(k), v) for k, v in state.items()], "flat"


@dataclass
class _Problems:
    missing: list[str]
    unexpected: list[str]
    mis_shaped: list[str]
    bad_values: list[str]

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.mis_shaped or self.bad_values)


def _check_tensor(name: str, value: Any, shape: tuple[int, ...]) -> tuple[str | None, str | None]:
    """(shape problem, value problem) of one expected tensor."""
    if not isinstance(value, torch.Tensor):
        return None, f"{name} is a {type(value).__name__}, not a tensor"
    if value.layout != torch.strided or value.is_meta:
        return None, f"{name} is a {value.layout} / meta tensor, not a dense tensor with data"
    if not value.is_floating_point():
        return None, f"{name} has dtype {str(value.dtype).removeprefix('torch.')}, not floating point"
    if tuple(value.shape) != shape:
        return f"{name}: {tuple(value.shape)}, expected {shape}", None
    # one sum: NaN/inf propagate, and a finite sum cannot overflow in the accumulator (fp16 values
    # are <= 65504, so float32 suffices and is ~2x faster than float64); far faster than
    # isfinite(value).all() on a CPU
    accumulator = torch.float32 if value.dtype == torch.float16 else torch.float64
    if not bool(torch.isfinite(value.sum(dtype=accumulator))):
        return None, f"{name} contains NaN or infinite values"
    return None, None


def _validate(pairs: list[tuple[str, Any]], expected: Mapping[str, tuple[int, ...]]
              ) -> tuple[dict[str, torch.Tensor], _Problems]:
    found: dict[str, torch.Tensor] = {}
    problems = _Problems([], [], [], [])
    for key, value in pairs:
        name = _canonical_key(key, expected)
        if name is None:
            problems.unexpected.append(key)
            continue
        if name in found:
            problems.unexpected.append(f"{key} (a second copy of {name})")
            continue
        shape_problem, value_problem = _check_tensor(key, value, expected[name])
        if shape_problem:
            problems.mis_shaped.append(shape_problem)
        if value_problem:
            problems.bad_values.append(value_problem)
        found[name] = value
    problems.missing = [name for name in expected if name not in found]
    return found, problems


def parse_adapter_state(state: Mapping[str, Any], source: str = "<checkpoint>",
                        expected: Mapping[str, tuple[int, ...]] | None = None) -> AdapterWeights:
    """Validate every key/shape/dtype of an animator.ckpt dict (official §3) and split it.

    `expected` (flat names -> shapes, see `flat_shapes`) defaults to SD1.5's official table;
    training passes the table of the model it trained on (e.g. a tiny test UNet)."""
    expected = EXPECTED_SHAPES if expected is None else expected
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, not a dict of tensors. "
                              + EXPECTED_FILE)
    pairs, container = _entries(state)
    found, problems = _validate(pairs, expected)
    if problems:
        raise CheckpointError(_describe_failure(state, source, container, len(found), problems, expected))
    resampler_keys, layer_keys = _split_expected(expected)
    return AdapterWeights(
        resampler={k: found[f"image_proj.{k}"] for k in resampler_keys},
        layers={i: {k: found[f"face_adapter.{i}.{k}"] for k in keys} for i, keys in layer_keys.items()})


# ---------------------------------------------------------------------------------------------
# Saying what a wrong file is


def _identify(state: Mapping[Any, Any], container: str, found: int, problems: _Problems,
              expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> str:
    """A sentence naming what the file seems to be and where it belongs, or ''."""
    kind = identify(state)
    if kind is not None and kind != "id-animator":
        return what_it_is(state)
    if found and problems.missing and not (problems.unexpected or problems.mis_shaped or problems.bad_values):
        return (f"It holds only {found} of the {len(expected)} adapter tensors, all correct: the file "
                "looks truncated or partial (an interrupted download or an incomplete save); re-download it.")
    if container != "flat" and not found:
        return f"It has a '{container}' container but none of the adapter keys inside."
    return ""


def _listed(items: list[str], cap: int = 6) -> str:
    shown = "; ".join(items[:cap])
    return shown + (f"; ... and {len(items) - cap} more" if len(items) > cap else "")


def _missing_groups(missing: list[str], expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> list[str]:
    """Missing names, whole groups folded: 'all 51 image_proj tensors', 'face_adapter.21.* (10 tensors)'."""
    gone = set(missing)
    items: list[str] = []
    resampler_keys, layer_keys = _split_expected(expected)
    resampler = [f"image_proj.{k}" for k in resampler_keys]
    items += [f"all {len(resampler)} image_proj tensors"] if gone.issuperset(resampler) else \
        [k for k in resampler if k in gone]
    layers = {i: [f"face_adapter.{i}.{k}" for k in layer] for i, layer in layer_keys.items()}
    if gone.issuperset(k for keys in layers.values() for k in keys):
        return items + [f"all {sum(map(len, layers.values()))} face_adapter tensors"]
    for index, keys in layers.items():
        items += [f"face_adapter.{index}.* ({len(keys)} tensors)"] if gone.issuperset(keys) else \
            [k for k in keys if k in gone]
    return items


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _describe_failure(state: Mapping[Any, Any], source: str, container: str, found: int,
                      problems: _Problems, expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> str:
    """The CheckpointError message: what the file is, what is wrong, what file is expected."""
    parts = [f"{source} is not a valid ID-Animator adapter checkpoint."]
    kind = _identify(state, container, found, problems, expected)
    if kind:
        parts.append(kind)
    details = []
    if len(problems.missing) == len(expected):
        details.append(f"none of the {len(expected)} adapter tensors (image_proj.* and "
                       "face_adapter.<1..31>.*, or image_proj_model.* and adapter_modules.*)")
    elif problems.missing:
        details.append(f"missing {len(problems.missing)} of {len(expected)} tensors "
                       f"({_listed(_missing_groups(problems.missing, expected))})")
    if problems.unexpected:
        details.append(f"{_count(len(problems.unexpected), 'unexpected key')} ({_listed(problems.unexpected)})")
    if problems.mis_shaped:
        details.append(f"{_count(len(problems.mis_shaped), 'tensor')} with the wrong shape "
                       f"({_listed(problems.mis_shaped)})")
    if problems.bad_values:
        details.append(f"{_count(len(problems.bad_values), 'bad value')} ({_listed(problems.bad_values)})")
    parts.append("Found: " + "; ".join(details) + ".")
    parts.append(EXPECTED_FILE)
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Loading, writing, generating


def read_adapter_file(path: str | Path) -> dict[str, Any]:
    """The raw dict of an adapter file, read safely (`weights_file.read_state_dict`). A file-level
    fault (empty, truncated, code in a pickle) is generic to any weights file; here it also says
    which file is expected where. LoadIDAnimator and `train export` both read through this."""
    try:
        return read_state_dict(path)
    except CheckpointError as error:  # same type: a MissingFileError stays a FileNotFoundError
        raise type(error)(f"{error} {EXPECTED_FILE}") from error


def load_adapter_checkpoint(path: str | Path,
                            expected: Mapping[str, tuple[int, ...]] | None = None) -> AdapterWeights:
    """Read and validate an ID-Animator adapter file (.ckpt/.pt/.pth/.bin or .safetensors).
    `expected`: as in `parse_adapter_state` (SD1.5's official shapes when None)."""
    return parse_adapter_state(read_adapter_file(path), source=str(path), expected=expected)


@contextlib.contextmanager
def clip_vision_expected() -> Iterator[None]:
    """Around reading a clip_vision file: a file-level fault (empty, junk, truncated, code in a
    pickle) is generic to any weights file; this adds which file goes in models/clip_vision/.
    LoadIDAnimator and the trainer both read through it, so both give the same message."""
    try:
        yield
    except CheckpointError as error:  # same type: a MissingFileError stays a FileNotFoundError
        raise type(error)(f"{error} Expected {CLIP_VISION_WANTED}.") from error


def check_clip_vision_h(source: str | Path, state: Mapping[Any, Any]) -> None:
    """Refuse any image encoder but CLIP ViT-H/14 (official §4.3), with the pack's one message:
    the node (ComfyUI's loader) and the trainer (transformers) both ask this first."""
    expect_kind(source, state, {"clip-vit-h"}, CLIP_VISION_WANTED)


LAYOUTS = ("state_dict", "flat")


def official_state_dict(weights: AdapterWeights, layout: str) -> dict[str, Any]:
    """The weights as written: "state_dict" is official §3.1 container 1 (`{"state_dict":
    {image_proj_model.*, adapter_modules.*}}`, animator.ckpt), "flat" ours (image_proj.<k>,
    face_adapter.<i>.<k>, the .safetensors). The readers take every official container."""
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown adapter layout {layout!r}; one of {', '.join(LAYOUTS)}")
    names = ("image_proj.", "face_adapter.") if layout == "flat" else ("image_proj_model.", "adapter_modules.")
    flat = {f"{names[0]}{k}": t for k, t in weights.resampler.items()}
    flat.update({f"{names[1]}{i}.{k}": t for i, layer in weights.layers.items() for k, t in layer.items()})
    return {"state_dict": flat} if layout == "state_dict" else flat


def save_adapter_safetensors(weights: AdapterWeights, path: str | Path) -> None:
    """Write the flat layout (image_proj.<k>, face_adapter.<i>.<k>) with metadata, verified:
    `weights_file.write_verified` re-reads it and compares every tensor before it takes its name."""
    tensors = official_state_dict(weights, "flat")
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": "1",
                "layout": "image_proj.<resampler key>, face_adapter.<official odd index>.<key>",
                "tensors": str(len(tensors)), "parameters": str(weights.parameter_count),
                "dtypes": ",".join(dtypes)}
    write_verified(path, tensors, container="safetensors", metadata=metadata)


def save_adapter_ckpt(weights: AdapterWeights, path: str | Path) -> None:
    """Write official §3.1 container 1, `{"state_dict": {image_proj_model.*, adapter_modules.*}}`,
    with torch.save, verified as `save_adapter_safetensors` is."""
    write_verified(path, official_state_dict(weights, "state_dict"), container="torch")


def random_adapter_weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> AdapterWeights:
    """Random weights with the official shapes (std 0.02; LayerNorm weights near 1), for tests."""
    generator = torch.Generator().manual_seed(seed)

    def make(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = torch.randn(shape, generator=generator) * 0.02
        if re.search(r"(norm\w*|\.1\.0)\.weight$", key):  # LayerNorm gains
            t += 1.0
        return t.to(dtype)

    return AdapterWeights(
        resampler={k: make(k, s) for k, s in RESAMPLER_SHAPES.items()},
        layers={i: {k: make(k, s) for k, s in layer.items()} for i, layer in ADAPTER_SHAPES.items()})


def describe(weights: AdapterWeights) -> str:
    """One line: tensor count, parameter count, dtypes and size in bytes."""
    nbytes = sum(t.numel() * t.element_size() for t in weights.tensors())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in weights.tensors()})
    return (f"{weights.tensor_count} tensors ({len(weights.resampler)} image_proj + "
            f"{sum(len(layer) for layer in weights.layers.values())} face_adapter), "
            f"{weights.parameter_count:,} parameters, {'/'.join(dtypes)}, {nbytes / 2**20:.1f} MiB")

