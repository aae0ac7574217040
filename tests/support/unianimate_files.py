"""Random UniAnimate UNet files in the official layout, for loader and workflow tests; made once.

`ensure_unianimate_file(cache)` returns `<cache>/generated/unianimate_random.<key>.safetensors`:
all 1544 tensors (1,416,564,300 parameters) of the official file in fp16 (about 2.8 GB), keys and
shapes from `id_animator.unianimate.checkpoint.expected_shapes` (the official class has the same
set: tests/unit/test_unianimate_unet.py). `sizes=REDUCED` writes `unianimate_reduced.<key>...`
instead: the same layout at base width 64 with one ResBlock per level (1016 tensors, 46 M
parameters, 92 MB), which LoadUniAnimate builds at its own size (`checkpoint.config_of`); the
workflow beds use it, since what they prove does not depend on the width, and the loader tests
keep the full-size file. Weights are N(0, 1/fan_in), norm scales 1, biases 0
(support.models.random_like_shapes). `fmt="pth"` writes the official container instead: a
`torch.save` pickle of {'state_dict': ...}, made only when a test asks for it. The key hashes the
sizes, this module, the unianimate sources and the torch version, as support.models does.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import struct
from pathlib import Path

import torch

from support.models import cached_file, prune_unused, random_like_shapes

REPO = Path(__file__).resolve().parents[2]
SEED = 51
FULL_SIZE: dict[str, int] = {}  # UniAnimateConfig overrides: none (the official sizes)
REDUCED = {"dim": 64, "num_res_blocks": 1, "num_heads": 2}  # the official structure at small widths


def _shapes(sizes: dict[str, int]) -> dict[str, tuple[int, ...]]:
    from id_animator.unianimate.checkpoint import expected_shapes
    from id_animator.unianimate.config import UniAnimateConfig

    return expected_shapes(UniAnimateConfig(**sizes))


def random_unianimate_state(sizes: dict[str, int] = FULL_SIZE, dtype: torch.dtype = torch.float16,
                            seed: int = SEED) -> dict[str, torch.Tensor]:
    return random_like_shapes({k: torch.Size(s) for k, s in _shapes(sizes).items()}, seed=seed, dtype=dtype)


def _key(sizes: dict[str, int]) -> str:
    """Changes with the layout (keys and shapes), this module, or torch's generator."""
    digest = hashlib.sha256(json.dumps(sorted(_shapes(sizes).items())).encode())
    digest.update(Path(__file__).read_bytes())
    digest.update(importlib.metadata.version("torch").encode())
    return digest.hexdigest()[:20]


def _write_safetensors(path: Path, sizes: dict[str, int]) -> None:
    """A standard safetensors file (u64 header length, JSON header, raw little-endian data),
    written tensor by tensor: safetensors' save_file would hold the 2.8 GB twice."""
    state = random_unianimate_state(sizes)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(state):
        size = state[key].numel() * state[key].element_size()
        header[key] = {"dtype": "F16", "shape": list(state[key].shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key in sorted(state):
            f.write(state.pop(key).contiguous().view(torch.uint8).numpy().tobytes())


def _write_pth(path: Path, sizes: dict[str, int]) -> None:
    with path.open("wb") as f:
        torch.save({"state_dict": random_unianimate_state(sizes)}, f)


def ensure_unianimate_file(cache: Path, fmt: str = "safetensors", sizes: dict[str, int] = FULL_SIZE) -> Path:
    """The generated file (made under a lock the first time; full size: about a minute and 2.8 GB)."""
    writers = {"safetensors": _write_safetensors, "pth": _write_pth}
    if fmt not in writers:
        raise ValueError(f"fmt must be one of {sorted(writers)}, not {fmt!r}")
    stem = "unianimate_random" if sizes == FULL_SIZE else "unianimate_reduced"
    path = cached_file(cache / "generated" / f"{stem}.{_key(sizes)}.{fmt}", lambda target: writers[fmt](target, sizes))
    prune_unused(cache, stem, keep=path)
    return path
