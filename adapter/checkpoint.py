"""Reading, validating and writing the ID-Animator adapter file (`animator.ckpt`, official §3).

The file holds the Resampler (`image_proj`, 51 tensors) and the 16 attn2 adapter modules
(`face_adapter`, odd indices 1..31, 10 tensors each). Every key, shape and dtype is checked;
a wrong file gets a message naming what it is (IP-Adapter, SDXL, motion module...).

Safety: `.safetensors` goes through safetensors; anything pickled goes ONLY through
`torch.load(..., weights_only=True)`. The real format is sniffed from the first bytes, never
taken from the file name: a `.safetensors` that is really a PyTorch pickle is read as a pickle
(still weights-only, so a pickle carrying code is refused whatever its name), with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
import struct
import tempfile
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError
from .layer_map import LAYERS, TEXT_CONTEXT_DIM

logger = logging.getLogger(__name__)

EXPECTED_FILE = ("Expected animator.ckpt from the ID-Animator Hugging Face Space "
                 "(huggingface.co/spaces/ID-Animator/ID-Animator), placed in models/id_animator/.")
SAFETENSORS_FORMAT = "id-animator"  # metadata "format" of the files save_adapter_safetensors writes

# Official §3.2: Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16,
# embedding_dim=1280, output_dim=768, ff_mult=4), the IP-Adapter-Plus SD1.5 layout.
RESAMPLER_DIM, RESAMPLER_DEPTH, NUM_QUERIES, CLIP_WIDTH, FF_MULT = 768, 4, 16, 1280, 4
LORA_RANK = 128  # official §3.3: rank-128 LoRA on attn2 q/k/v/out
ADAPTER_WIDTHS: dict[int, int] = {layer.official_index: layer.channels for layer in LAYERS}  # §3.4


def resampler_shapes(dim: int = RESAMPLER_DIM, depth: int = RESAMPLER_DEPTH, dim_head: int = 64,
                     heads: int = 12, num_queries: int = NUM_QUERIES, embedding_dim: int = CLIP_WIDTH,
                     output_dim: int = TEXT_CONTEXT_DIM, ff_mult: int = FF_MULT) -> dict[str, tuple[int, ...]]:
    """The `image_proj` tensors of a Resampler; the defaults give official §3.2's 51 tensors
    (29,918,208 parameters). Other sizes serve models trained at other widths (tiny test UNets)."""
    d, inner, ff = dim, dim_head * heads, dim * ff_mult
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, num_queries, d),
        "proj_in.weight": (d, embedding_dim), "proj_in.bias": (d,),
        "proj_out.weight": (output_dim, d), "proj_out.bias": (output_dim,),
        "norm_out.weight": (output_dim,), "norm_out.bias": (output_dim,),
    }
    for layer in range(depth):
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
# Reading files


def _sniff_format(head: bytes, size: int) -> str:
    """The real container format from the first bytes (never from the name)."""
    if size == 0:
        return "empty"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"  # legacy torch.save, or a raw pickle
    if head.startswith(b"version https://git-lfs"):
        return "lfs-pointer"
    if head.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "html"
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= 100_000_000:
        return "safetensors"  # u64 little-endian header length, then the JSON header
    return "unknown"


_FORMAT_NAMES = {"torch-zip": "a PyTorch (zip) checkpoint", "pickle": "a Python/PyTorch pickle",
                 "safetensors": "a safetensors file"}
_EXPECTED_FORMAT = {".safetensors": "safetensors", ".sft": "safetensors", ".ckpt": "torch",
                    ".pt": "torch", ".pth": "torch", ".bin": "torch"}


def _name_mismatch(path: Path, fmt: str) -> str:
    """' (named .safetensors but really a pickle)' when the extension lies, else ''."""
    expected = _EXPECTED_FORMAT.get(path.suffix.lower())
    actual = "safetensors" if fmt == "safetensors" else "torch"
    if expected is None or expected == actual or fmt not in _FORMAT_NAMES:
        return ""
    return f" (named {path.suffix} but really {_FORMAT_NAMES[fmt]})"


def _read_safetensors(path: Path, size: int) -> dict[str, Any]:
    """safetensors.torch.load_file, after checking the header against the file size."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or partial download (the safetensors header "
                                  f"alone needs {8 + header_len} bytes, the file has {size}): re-download it.")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                           default=0)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download the file.") from e
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated or partial download ({size} of "
                              f"{8 + header_len + data_end} bytes): re-download it.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); re-download it.") from e


def _refused_object(message: str) -> str:
    """What the weights-only unpickler refused, e.g. 'posix.system', from torch's message."""
    found = re.search(r"GLOBAL\s+([\w.]+)", message)
    if found:
        return f"it asks for the Python object {found.group(1)}"
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    detail = next((line for line in lines if "Unsupported" in line or "unsupported" in line), "")
    return detail or "it needs more than tensors to unpickle"


def _read_torch(path: Path, fmt: str, mismatch: str) -> Any:
    """torch.load with weights_only=True only; code-carrying pickles are refused, never run."""
    if fmt == "torch-zip":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointError(f"{path}{mismatch}: truncated or partial download (the zip archive "
                                  "has lost its index, which sits at the end): re-download it.") from e
        if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
            raise CheckpointError(f"{path}{mismatch}: a zip archive but not a PyTorch checkpoint "
                                  f"(no data.pkl among {len(names)} entries).")
    try:
        # an open file, not the path: torch.load would pick its reader from a ".safetensors" name
        with path.open("rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols > 2
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}{mismatch}: refused: the file contains code or Python objects that a weights "
            f"file should not have, or is no weights pickle at all ({_refused_object(str(e))}). "
            "It was NOT loaded (only torch.load(weights_only=True) is used, which never runs code "
            "from a file). "
            "Re-download the checkpoint from its official source, or convert it to .safetensors "
            "with a tool you trust.") from e
    except (EOFError, RuntimeError) as e:
        raise CheckpointError(f"{path}{mismatch}: truncated, partial or corrupt checkpoint "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): "
                              "re-download it.") from e
    except Exception as e:  # noqa: BLE001 - any other reader failure is a bad file, said as such
        raise CheckpointError(f"{path}{mismatch}: could not be read as a PyTorch checkpoint "
                              f"({type(e).__name__}: {e}).") from e


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The raw dict stored in a .safetensors or PyTorch (.ckpt/.pt/.pth/.bin) file, read safely."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError / IsADirectoryError pass through as OSError
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a weights file.")
    with path.open("rb") as f:
        head = f.read(64)
    fmt = _sniff_format(head, size)
    if fmt == "empty":
        raise CheckpointError(f"{path}: the file is empty (0 bytes), an interrupted download? "
                              "Re-download it.")
    if fmt == "lfs-pointer":
        raise CheckpointError(f"{path}: a Git LFS pointer file ({size} bytes), not the weights: "
                              "download the file itself (git lfs pull, or the download button).")
    if fmt == "html":
        raise CheckpointError(f"{path}: an HTML page, not a weights file (a failed or login-walled "
                              "download): download the file itself.")
    if fmt == "unknown":
        raise CheckpointError(f"{path}: neither a safetensors file nor a PyTorch checkpoint "
                              f"({size} bytes starting {head[:8].hex(' ')}): a corrupt or wrong file; "
                              "re-download it.")
    mismatch = _name_mismatch(path, fmt)
    if fmt == "safetensors":
        state: Any = _read_safetensors(path, size)
    else:
        state = _read_torch(path, fmt, mismatch)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}{mismatch}: holds a {type(state).__name__}, not a dict of "
                              "tensors; not a weights file.")
    if mismatch:
        logger.warning("%s%s: read it as what it really is", path, mismatch)
    return dict(state)


# ---------------------------------------------------------------------------------------------
# Validating the content


def _canonical_key(key: object, expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> str | None:
    """The flat name (image_proj.<k> / face_adapter.<i>.<k>) of an official key, else None."""
    if not isinstance(key, str):
        return None
    key = key.removeprefix("module.")  # DDP prefix, official §3.1
    for prefix, canonical in (("image_proj_model.", "image_proj."), ("adapter_modules.", "face_adapter."),
                              ("image_proj.", "image_proj."), ("face_adapter.", "face_adapter.")):
        if key.startswith(prefix):
            name = canonical + key[len(prefix):]
            return name if name in expected else None
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


def _flat_shapes(state: Mapping[Any, Any], prefix: str = "", depth: int = 0) -> dict[str, tuple[int, ...] | None]:
    """Every key path in nested dicts -> tensor shape (None for non-tensors)."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 4:
            shapes.update(_flat_shapes(value, f"{path}.", depth + 1))
        else:
            shapes[path] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
    return shapes


def _width(shapes: dict[str, tuple[int, ...] | None], *suffixes: str, dim: int = -1) -> set[int]:
    """Sizes along `dim` of the tensors whose key ends with one of `suffixes`."""
    return {s[dim] for k, s in shapes.items() if s and k.endswith(suffixes)}


def _looks_sdxl(shapes: dict[str, tuple[int, ...] | None]) -> bool:
    """SDXL signals: 2048-wide context, adapter indices past 31 (SDXL has 70 odd ones), 2048 output."""
    context = _width(shapes, "to_k_face.weight", "to_k_ip.weight", "to_k_lora.down.weight")
    indices = {int(m.group(1)) for k in shapes
               if (m := re.search(r"(?:adapter_modules|face_adapter|ip_adapter)\.(\d+)\.", k))}
    outputs = _width(shapes, "image_proj.proj_out.weight", "image_proj_model.proj_out.weight", dim=0)
    return 2048 in context or max(indices, default=0) > 31 or 2048 in outputs


def _identify(state: Mapping[Any, Any], container: str, found: int, problems: _Problems,
              expected: Mapping[str, tuple[int, ...]] = EXPECTED_SHAPES) -> str:
    """A sentence naming what the file seems to be and where it belongs, or ''."""
    shapes = _flat_shapes(state)
    keys = list(shapes)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)model\.diffusion_model\."):
        family = "an SDXL" if has(r"(^|\.)conditioner\.embedders\.") else "a Stable Diffusion"
        return (f"It looks like {family} model checkpoint (UNet, VAE and text encoder), not the face "
                "adapter; it belongs in models/checkpoints/.")
    if has(r"(^|\.)motion_modules\.") or has(r"temporal_transformer\."):
        return ("It looks like an AnimateDiff motion module (such as mm_sd_v15_v2.ckpt); it belongs in "
                "AnimateDiff-Evolved's models/animatediff_models/.")
    if has(r"(^|\.)vision_model\.") or has(r"(^|\.)visual\.transformer\."):
        width = _width(shapes, "class_embedding", dim=-1)
        name = {1280: "ViT-H/14", 1024: "ViT-L/14", 1664: "ViT-bigG/14"}.get(next(iter(width), 0), "")
        return (f"It looks like a CLIP vision model{f' ({name})' if name else ''}, not the face adapter; "
                "it belongs in models/clip_vision/ (LoadIDAnimator's clip_vision_name input).")
    if has(r"(^|\.)ip_adapter\.") or has(r"to_k_ip\."):
        faceid = has(r"to_q_lora\.") or has(r"image_proj\.(proj\.0\.|perceiver_resampler\.)")
        kind = ("an IP-Adapter FaceID file" if faceid else
                "an IP-Adapter Plus file" if has(r"image_proj\.latents$") else "an IP-Adapter file")
        base = "SDXL" if _looks_sdxl(shapes) else "SD1.5"
        return (f"It looks like {kind} for {base} (ip_adapter keys with to_k_ip), not ID-Animator (which has "
                "face_adapter / adapter_modules keys with to_k_face); it belongs in models/ipadapter/.")
    if _looks_sdxl(shapes):
        return ("It looks like an adapter for SDXL (2048-wide context or 70 attention layers); "
                "ID-Animator is for SD1.5 and needs its SD1.5 animator.ckpt.")
    if has(r"^lora_(unet|te)_") or has(r"\.lora_(down|up)\.weight$"):
        return "It looks like a LoRA file; it belongs in models/loras/."
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


def load_adapter_checkpoint(path: str | Path,
                            expected: Mapping[str, tuple[int, ...]] | None = None) -> AdapterWeights:
    """Read and validate an ID-Animator adapter file (.ckpt/.pt/.pth/.bin or .safetensors).

    Every refusal ends by saying which file is expected where: content errors already do, file
    errors (empty, truncated, code in a pickle) are generic to any weights file and get it here.
    `expected`: as in `parse_adapter_state` (SD1.5's official shapes when None)."""
    try:
        state = read_state_dict(path)
    except CheckpointError as error:
        raise CheckpointError(f"{error} {EXPECTED_FILE}") from error
    return parse_adapter_state(state, source=str(path), expected=expected)


LAYOUTS = ("state_dict", "state_dict_module", "image_proj+face_adapter", "flat", "bare")


def official_state_dict(weights: AdapterWeights, layout: str) -> dict[str, Any]:
    """The weights in one container layout: the two official ones of §3.1, ours, or bare keys."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    if layout == "image_proj+face_adapter":
        return {"image_proj": dict(weights.resampler),
                "face_adapter": {f"{i}.{k}": t for i, layer in weights.layers.items() for k, t in layer.items()}}
    names = (("image_proj.", "face_adapter.") if layout == "flat"
             else ("image_proj_model.", "adapter_modules."))
    flat = {f"{names[0]}{k}": t for k, t in weights.resampler.items()}
    flat.update({f"{names[1]}{i}.{k}": t for i, layer in weights.layers.items() for k, t in layer.items()})
    if layout == "state_dict_module":
        return {"state_dict": {f"module.{k}": t for k, t in flat.items()}}
    return {"state_dict": flat} if layout == "state_dict" else flat


def save_adapter_safetensors(weights: AdapterWeights, path: str | Path) -> None:
    """Write the flat layout (image_proj.<k>, face_adapter.<i>.<k>) atomically, with metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    # clone: safetensors refuses views and tensors sharing storage
    tensors = {k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for k, t in official_state_dict(weights, "flat").items()}
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    metadata = {"format": SAFETENSORS_FORMAT, "format_version": "1",
                "layout": "image_proj.<resampler key>, face_adapter.<official odd index>.<key>",
                "tensors": str(len(tensors)), "parameters": str(weights.parameter_count),
                "dtypes": ",".join(dtypes)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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

