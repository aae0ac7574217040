"""Model files, for every model family of the pack: reading, naming a wrong file, key names, writing.

Public API (pure PyTorch + safetensors; no ComfyUI):

- `read_state_dict(path) -> dict`: the dict stored in a `.safetensors` or PyTorch
  (`.ckpt/.pt/.pth/.bin`) file, read safely. The container is sniffed from the bytes, never taken
  from the name (a `.safetensors` that is really a pickle is read as a pickle, with a warning);
  pickles go ONLY through `torch.load(weights_only=True)` on the opened file, so a file carrying
  code is refused, never run. Empty files, Git LFS pointers, HTML pages, truncated downloads and
  unknown bytes raise `CheckpointError` saying so and what to do.
- `WeightsFile(path)`: the same reader, lazy: keys and shapes at once, tensors when asked (a loader
  takes just its part of a 2-4 GB checkpoint); `.shapes`, `.keys(prefix)`, `.get(key)`, `.tensors(prefix)`.
- `identify(state) -> str | None`: which model a state dict (tensors, or key -> shape) holds, as a
  key of `KINDS` ("sd15-checkpoint", "clip-vit-l", "motion-module", "unianimate-unet", ...), from its
  keys and shapes; `KINDS[kind]` says what it is and where it belongs. ONE table for the pack.
- `expect_kind(source, state, kinds, wanted)`: raise the pack's one message for a wrong file.
- `canonical_key(key) -> str`: a key without the wrappers training adds (`module.` of DDP,
  `_orig_mod.` of `torch.compile`), the one key rule of the pack.
- `write_verified(path, tensors, container=..., metadata=...)`: written under a temporary name,
  fsynced, re-read with `read_state_dict`, compared bit for bit, then renamed into place; a failed
  write leaves the old file as it was.
- `DTYPES`: the one table of tensor type names ("fp32", "fp16", "bf16") the commands accept.

A second model family (UniAnimate) calls the same functions: its UNet is a `KINDS` entry, and its
loader checks `identify(state) == "unianimate-unet"`.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, MissingFileError
from .files import atomic_path

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MMAP_BYTES = 1 << 30  # zip checkpoints this large are memory-mapped instead of read whole


# ---------------------------------------------------------------------------------------------
# Reading


def sniff_format(head: bytes, size: int) -> str:
    """The real container format from the first bytes: empty, torch-zip, pickle, lfs-pointer,
    html, safetensors or unknown."""
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
    suffix = Path(path.name.removesuffix(".tmp")).suffix  # a file being written keeps its suffix
    expected = _EXPECTED_FORMAT.get(suffix.lower())
    actual = "safetensors" if fmt == "safetensors" else "torch"
    if expected is None or expected == actual or fmt not in _FORMAT_NAMES:
        return ""
    return f" (named {suffix} but really {_FORMAT_NAMES[fmt]})"


def _sniff(path: Path) -> tuple[str, int, bytes]:
    """(format, size, first bytes) of a file; the file-level faults raise here."""
    if not path.exists():
        raise MissingFileError(f"{path} does not exist; give the path of the model file.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file.")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    fmt = sniff_format(head, size)
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
    return fmt, size, head


def _check_safetensors(path: Path, size: int) -> None:
    """The header must parse and the data it promises must fit in the file."""
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        if 8 + header_len > size:
            raise CheckpointError(f"{path}: truncated or partial download (the safetensors header "
                                  f"alone needs {8 + header_len} bytes, the file has {size}): re-download it.")
        try:
            header = json.loads(f.read(header_len))
            data_end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
                           default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e}); re-download the file.") from e
    if 8 + header_len + data_end > size:
        raise CheckpointError(f"{path}: truncated or partial download ({size} of "
                              f"{8 + header_len + data_end} bytes): re-download it.")


def _read_safetensors(path: Path, size: int) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _check_safetensors(path, size)
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


def _read_torch(path: Path, fmt: str, size: int, mismatch: str) -> Any:
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols > 2
            if fmt == "torch-zip" and size >= _MMAP_BYTES:
                # mmap needs the path; the format was sniffed above, so no name decides the reader
                return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            # an open file, not the path: torch.load would pick its reader from a ".safetensors" name
            with path.open("rb") as f:
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
    fmt, size, _ = _sniff(path)
    mismatch = _name_mismatch(path, fmt)
    state = _read_safetensors(path, size) if fmt == "safetensors" else _read_torch(path, fmt, size, mismatch)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}{mismatch}: holds a {type(state).__name__}, not a dict of "
                              "tensors; not a weights file.")
    if mismatch:
        logger.warning("%s%s: read it as what it really is", path, mismatch)
    return dict(state)


class WeightsFile:
    """A weights file read lazily: keys and shapes at once, tensors only when asked. A pickled
    file is read whole (weights-only); a Lightning-era `{"state_dict": ...}` is unwrapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        fmt, size, _ = _sniff(self.path)
        self._state: dict[str, torch.Tensor] | None
        if fmt == "safetensors":
            from safetensors import SafetensorError, safe_open

            _check_safetensors(self.path, size)
            try:
                self._file = safe_open(str(self.path), "pt")
                self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
            except (SafetensorError, ValueError, RuntimeError, OSError) as e:
                raise CheckpointError(f"{self.path}: unreadable safetensors file ({e}); re-download it.") from e
            self._state = None
        else:
            state = read_state_dict(self.path)
            if isinstance(state.get("state_dict"), Mapping):
                state = dict(state["state_dict"])
            self._state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
            self.shapes = {k: tuple(v.shape) for k, v in self._state.items()}

    def keys(self, prefix: str = "") -> list[str]:
        return [k for k in self.shapes if k.startswith(prefix)]

    def get(self, key: str) -> torch.Tensor:
        return self._state[key] if self._state is not None else self._file.get_tensor(key)

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.keys(prefix)}


# ---------------------------------------------------------------------------------------------
# Key names


_WRAPPERS = ("module.", "_orig_mod.")  # DDP / accelerate, torch.compile (in any order, nested)


def canonical_key(key: str) -> str:
    """`key` without the prefixes training wrappers add: `module.` (DDP) and `_orig_mod.`
    (torch.compile), however nested, e.g. `module._orig_mod.image_proj_model.latents`."""
    stripped = True
    while stripped:
        stripped = False
        for wrapper in _WRAPPERS:
            if key.startswith(wrapper):
                key, stripped = key[len(wrapper):], True
    return key


# ---------------------------------------------------------------------------------------------
# Naming a file by its keys and shapes


@dataclass(frozen=True)
class FileKind:
    description: str  # "a CLIP ViT-L/14 vision model"
    belongs: str  # where the file goes, e.g. "models/clip_vision/"


# The one table: what each kind of file is and where it goes (the ComfyUI folder).
KINDS: dict[str, FileKind] = {
    "sd15-checkpoint": FileKind("an SD1.5 model checkpoint (UNet, VAE and text encoder)", "models/checkpoints/"),
    "sd15-inpaint-checkpoint": FileKind("an SD1.5 inpainting or instruct checkpoint (its UNet takes more "
                                        "than 4 input channels)", "models/checkpoints/"),
    "sd2-checkpoint": FileKind("an SD2.x model checkpoint (1024-wide text encoder)", "models/checkpoints/"),
    "sdxl-checkpoint": FileKind("an SDXL model checkpoint", "models/checkpoints/"),
    "sd15-unet": FileKind("an SD1.5 UNet-only file (no VAE or text encoder)", "models/diffusion_models/"),
    "sd2-unet": FileKind("an SD2.x UNet-only file (1024-wide text)", "models/diffusion_models/"),
    "sdxl-unet": FileKind("an SDXL UNet-only file (2048-wide text)", "models/diffusion_models/"),
    "unianimate-unet": FileKind("the UniAnimate video UNet", "models/unianimate/"),
    "motion-module": FileKind("an AnimateDiff motion module (such as mm_sd_v15_v2.ckpt)",
                              "AnimateDiff-Evolved's models/animatediff_models/"),
    "clip-vit-l": FileKind("a CLIP ViT-L/14 vision model", "models/clip_vision/"),
    "clip-vit-h": FileKind("a CLIP ViT-H/14 vision model", "models/clip_vision/"),
    "clip-vit-bigg": FileKind("a CLIP ViT-bigG/14 vision model", "models/clip_vision/"),
    "clip-vision": FileKind("a CLIP vision model of another size", "models/clip_vision/"),
    "ip-adapter-sd15": FileKind("an IP-Adapter file for SD1.5", "models/ipadapter/"),
    "ip-adapter-plus-sd15": FileKind("an IP-Adapter Plus file for SD1.5", "models/ipadapter/"),
    "ip-adapter-faceid-sd15": FileKind("an IP-Adapter FaceID file for SD1.5", "models/ipadapter/"),
    "ip-adapter-sdxl": FileKind("an IP-Adapter file for SDXL", "models/ipadapter/"),
    "ip-adapter-plus-sdxl": FileKind("an IP-Adapter Plus file for SDXL", "models/ipadapter/"),
    "ip-adapter-faceid-sdxl": FileKind("an IP-Adapter FaceID file for SDXL", "models/ipadapter/"),
    "id-animator": FileKind("an ID-Animator face adapter", "models/id_animator/"),
    "id-animator-sdxl": FileKind("a face adapter for SDXL (2048-wide context or 70 attention layers); "
                                 "ID-Animator is for SD1.5", "no folder of this pack"),
    "lora": FileKind("a LoRA", "models/loras/"),
    "controlnet": FileKind("a ControlNet", "models/controlnet/"),
    "vae": FileKind("a standalone VAE", "models/vae/"),
    "text-encoder": FileKind("a text encoder only", "models/text_encoders/"),
}
_VISION_WIDTHS = {1024: "clip-vit-l", 1280: "clip-vit-h", 1664: "clip-vit-bigg"}  # the one width table


def flat_shapes(state: Mapping[Any, Any], prefix: str = "", depth: int = 0) -> dict[str, tuple[int, ...] | None]:
    """Every key path of (nested) dicts -> its shape: tensors, shape tuples, else None."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and depth < 4:
            shapes.update(flat_shapes(value, f"{path}.", depth + 1))
        elif isinstance(value, torch.Tensor):
            shapes[path] = tuple(value.shape)
        elif isinstance(value, tuple) and all(isinstance(n, int) for n in value):
            shapes[path] = value
        else:
            shapes[path] = None
    return shapes


def _widths(shapes: Mapping[str, tuple[int, ...] | None], suffixes: Iterable[str], dim: int = -1) -> set[int]:
    suffixes = tuple(suffixes)
    return {s[dim] for k, s in shapes.items() if s and k.endswith(suffixes)}


def _base(shapes: Mapping[str, tuple[int, ...] | None], contexts: set[int]) -> str:
    """sd15 / sd2 / sdxl from the cross-attention width (and SDXL's 70 adapter indices)."""
    indices = {int(m.group(1)) for k in shapes
               if (m := re.search(r"(?:adapter_modules|face_adapter|ip_adapter)\.(\d+)\.", k))}
    if 2048 in contexts or max(indices, default=0) > 31:
        return "sdxl"
    return "sd2" if 1024 in contexts else "sd15"


def identify(state: Mapping[Any, Any]) -> str | None:
    """The `KINDS` key of what a state dict (tensors or shapes, nested or flat) holds, else None."""
    shapes = {canonical_key(k): s for k, s in flat_shapes(state).items()}
    keys = list(shapes)

    def has(pattern: str) -> bool:
        return any(re.search(pattern, k) for k in keys)

    if has(r"(^|\.)dwpose_embedding\.") or has(r"(^|\.)randomref_embedding2?\."):
        return "unianimate-unet"
    if has(r"(^|\.)model\.diffusion_model\.") or has(r"^input_blocks\.0\.0\.weight$"):
        unet = "model.diffusion_model." if has(r"(^|\.)model\.diffusion_model\.") else ""
        contexts = _widths({k: s for k, s in shapes.items() if unet in k}, ["attn2.to_k.weight"])
        if has(r"(^|\.)conditioner\.embedders\.") or has(r"(^|\.)label_emb\."):
            base = "sdxl"
        elif has(r"(^|\.)cond_stage_model\.model\.transformer\."):
            base = "sd2"
        else:
            base = _base({}, contexts)
        if not unet:
            return f"{base}-unet"
        channels = next((s[1] for k, s in shapes.items() if s and len(s) == 4
                         and k.endswith(f"{unet}input_blocks.0.0.weight")), 4)
        return "sd15-inpaint-checkpoint" if base == "sd15" and channels != 4 else f"{base}-checkpoint"
    if has(r"(^|\.)motion_modules\.") or has(r"temporal_transformer\."):
        return "motion-module"
    if has(r"(^|\.)vision_model\.") or has(r"(^|\.)visual\.transformer\."):
        width = next(iter(_widths(shapes, ["class_embedding"])), 0)
        return _VISION_WIDTHS.get(width, "clip-vision")
    if has(r"(^|\.)ip_adapter\.") or has(r"to_k_ip\."):
        base = "sdxl" if _base(shapes, _widths(shapes, ["to_k_ip.weight"])) == "sdxl" or \
            2048 in _widths(shapes, ["image_proj.proj_out.weight"], dim=0) else "sd15"
        faceid = has(r"to_q_lora\.") or has(r"image_proj\.(proj\.0\.|perceiver_resampler\.)")
        kind = "ip-adapter-faceid" if faceid else "ip-adapter-plus" if has(r"image_proj\.latents$") else "ip-adapter"
        return f"{kind}-{base}"
    if has(r"(^|\.)(image_proj_model|adapter_modules|face_adapter)\.") or has(r"(^|\.)image_proj\.latents$"):
        contexts = _widths(shapes, ["to_k_face.weight", "to_k_lora.down.weight"])
        outputs = _widths(shapes, ["image_proj.proj_out.weight", "image_proj_model.proj_out.weight"], dim=0)
        sdxl = _base(shapes, contexts) == "sdxl" or 2048 in outputs
        return "id-animator-sdxl" if sdxl else "id-animator"
    if has(r"^lora_(unet|te)_") or has(r"\.lora_(down|up)\.weight$") or has(r"\.lora_[AB]\.weight$"):
        return "lora"
    if has(r"(^|\.)control_model\.") or has(r"(^|\.)input_hint_block\."):
        return "controlnet"
    if has(r"(^|\.)encoder\.down\.") and has(r"(^|\.)decoder\.up\."):
        return "vae"
    if has(r"(^|\.)text_model\.") or has(r"(^|\.)transformer\.text_model\."):
        return "text-encoder"
    return None


def what_it_is(state: Mapping[Any, Any]) -> str:
    """'It looks like <kind>; it belongs in <folder>.', or '' for a file of no known kind."""
    kind = identify(state)
    if kind is None:
        return ""
    found = KINDS[kind]
    return f"It looks like {found.description}; it belongs in {found.belongs}."


def expect_kind(source: str | Path, state: Mapping[Any, Any], kinds: Iterable[str], wanted: str) -> str:
    """The kind of `state` when it is one of `kinds`, else CheckpointError: '<source> is not
    <wanted>. It looks like ...; it belongs in .... '. `wanted` names the expected file and where."""
    kind = identify(state)
    if kind in set(kinds):
        return kind
    if kind is None:
        keys = list(flat_shapes(state))
        found = f"It is no model file this pack knows (first keys: {', '.join(keys[:3]) or 'none'})."
    else:
        found = f"It looks like {KINDS[kind].description}; it belongs in {KINDS[kind].belongs}."
    raise CheckpointError(f"{source} is not {wanted}. {found}")


# ---------------------------------------------------------------------------------------------
# Writing


def _same_bits(a: Any, b: Any) -> bool:
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return a == b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def _flat_tensors(state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat.update(_flat_tensors(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_verified(path: str | Path, state: Mapping[str, Any], *, container: str = "safetensors",
                   metadata: Mapping[str, str] | None = None) -> None:
    """Write `state` (safetensors: a flat dict of tensors; torch: any weights-only dict) to `path`:
    temporary name, fsync, re-read with `read_state_dict`, every tensor compared bit for bit, then
    renamed into place. Raises CheckpointError (and leaves `path` untouched) when the bytes read
    back differ: a full disk or failing storage."""
    if container not in ("safetensors", "torch"):
        raise CheckpointError(f"write_verified: container is 'safetensors' or 'torch', not {container!r}.")
    path = Path(path)
    # clone: safetensors refuses views and tensors sharing storage
    written = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               if isinstance(v, torch.Tensor) else v for k, v in _flat_tensors(state).items()}
    with atomic_path(path) as tmp:
        if container == "safetensors":
            from safetensors.torch import save_file

            save_file(written, str(tmp), metadata=dict(metadata or {}))
        else:
            torch.save(dict(state), tmp)
        back = _flat_tensors(read_state_dict(tmp))
        differing = [k for k in written if k not in back or not _same_bits(written[k], back[k])]
        differing += [k for k in back if k not in written]
        if differing:
            raise CheckpointError(
                f"{path}: {len(differing)} tensors read back differ from those written "
                f"({', '.join(differing[:4])}{', ...' if len(differing) > 4 else ''}): the write was "
                f"corrupted (full disk, failing storage?). Nothing was kept; write it again.")
