"""The UniAnimate UNet file (`unianimate_16f_32f_non_ema_223000.pth`): its key/shape schema and a
strict check that names what is missing, unexpected or mis-shaped, and what the file probably is.

The schema is derived from the config (the module built on the meta device), never listed by
hand; a file's config is read from its shapes (`config_of`), so a file of another width in the
official layout (a distilled model, a test stand-in) loads at its own size. The official file is
a pickle saved with `torch.save`; the official loader takes the dict under a `state_dict` key
when there is one, then loads strictly (so no `module.` prefix). Reading
goes through `adapter.weights_file.read_state_dict` only (the pack's one safe reader: safetensors, or
`torch.load(weights_only=True)` on the opened file; code-carrying pickles are refused unrun).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..adapter.weights_file import KINDS, canonical_key, identify, read_state_dict
from .config import OFFICIAL, UniAnimateConfig
from .errors import CheckpointError

EXPECTED_FILE = ("the UniAnimate UNet, unianimate_16f_32f_non_ema_223000.pth from ModelScope iic/unianimate "
                 "(or a .safetensors conversion of it), in models/unianimate/")
WRAPPER_KEYS = ("state_dict",)  # official E `worker`: the dict under 'state_dict' when present


@functools.lru_cache(maxsize=4)
def expected_shapes(config: UniAnimateConfig = OFFICIAL) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor of the UNet for `config` (1544 for the official one)."""
    from .unet import UniAnimateUNet

    unet = UniAnimateUNet(config, device="meta")
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def config_of(tensors: Mapping[str, Any]) -> UniAnimateConfig:
    """The sizes a file was built with, read from its shapes: the base width (the input conv), the
    heads of the temporal transformer after it, and the ResBlocks per level (from the number of
    encoder steps: the input step, `num_res_blocks` per level and a downsample between levels).
    Every other size is the official one (`head_dim` too: it is not in the shapes). A file without
    those keys, or with sizes no config has, gets OFFICIAL, so that the strict check names what is
    wrong with it."""
    conv, proj = tensors.get("input_blocks.0.0.weight"), tensors.get("input_blocks.0.1.proj_in.weight")
    if not (isinstance(conv, torch.Tensor) and conv.ndim == 4 and isinstance(proj, torch.Tensor) and proj.ndim == 3):
        return OFFICIAL
    steps = len({k.split(".")[1] for k in tensors if isinstance(k, str) and k.startswith("input_blocks.")})
    levels = len(OFFICIAL.dim_mult)
    res_blocks, rest = divmod(steps - levels, levels)
    dim, inner = conv.shape[0], proj.shape[0]
    if (rest or res_blocks < 1 or not dim or not inner or inner % OFFICIAL.head_dim
            or dim % OFFICIAL.group_norm_groups):
        return OFFICIAL
    return dataclasses.replace(OFFICIAL, dim=dim, num_heads=inner // OFFICIAL.head_dim, num_res_blocks=res_blocks)


def unwrap(state: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """(tensors, where they were): the `state_dict` wrapper is taken off, and keys follow the
    pack's one key rule (`weights_file.canonical_key`: DDP's `module.`, torch.compile's `_orig_mod.`)."""
    where = "top level"
    for key in WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping):
            state, where = inner, f"under {key!r}"
    renamed = {canonical_key(k) if isinstance(k, str) else k: v for k, v in state.items()}
    if renamed.keys() != state.keys():
        state, where = renamed, where + " (training wrappers 'module.'/'_orig_mod.' removed from the keys)"
    return state, where


def _listed(items: list[str], cap: int = 5) -> str:
    shown = ", ".join(items[:cap])
    return shown + (f" and {len(items) - cap} more" if len(items) > cap else "")


def _what_it_is(tensors: Mapping[str, Any], keys: set[str], expected: Mapping[str, tuple[int, ...]]) -> str:
    """What a file that is not the UniAnimate UNet probably is: the pack's one identifier
    (adapter.weights_file) names other models; for UniAnimate-like files, how they differ."""
    kind = identify(tensors)
    if kind not in (None, "unianimate-unet"):
        found = f"{KINDS[kind].description} (it belongs in {KINDS[kind].belongs})"
        if kind.endswith("-unet"):
            found += ", an image UNet without UniAnimate's temporal and pose layers: UniAnimate needs its own UNet file"
        return found
    ours = keys & set(expected)
    if not ours:
        return "no model file this pack knows (none of the UniAnimate UNet's keys match)"
    if not any("temopral_conv" in k for k in keys):
        return ("an image UNet without UniAnimate's temporal and pose layers (an SD2.1-style UNet); "
                "UniAnimate needs its own UNet file")
    if ours == keys and len(ours) < len(expected):
        return (f"an incomplete UniAnimate UNet ({len(ours)} of {len(expected)} tensors): a truncated "
                "or partial download, or a file saved from part of the model")
    return "a model of the UniAnimate family with a different layout (another release, e.g. Animate-X, or another size)"


def check_state_dict(state: Mapping[str, Any], source: str = "<state dict>",
                     config: UniAnimateConfig | None = None) -> dict[str, torch.Tensor]:
    """The UNet's tensors from a loaded file, after a strict key/shape check against `config`
    (default: the file's own, `config_of`); a CheckpointError names the missing, unexpected and
    mis-shaped keys and what the file probably is."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{source}: holds a {type(state).__name__}, not a dict of tensors. Expected {EXPECTED_FILE}.")
    tensors, where = unwrap(state)
    expected = expected_shapes(config or config_of(tensors))
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    keys = {k for k in tensors if isinstance(k, str)}
    not_tensors = sorted(k for k in keys if k in expected and k not in shapes)
    missing = sorted(set(expected) - keys)
    unexpected = sorted(keys - set(expected))
    misshaped = sorted(k for k in set(expected) & set(shapes) if shapes[k] != expected[k])
    not_float = sorted(k for k in set(expected) & set(shapes) if not tensors[k].is_floating_point())
    if not (missing or unexpected or misshaped or not_tensors or not_float):
        return {k: tensors[k] for k in expected}
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected)} UNet tensors missing ({_listed(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys ({_listed(unexpected)})")
    if misshaped:
        problems.append("wrong shapes: " + _listed([f"{k} is {list(shapes[k])}, expected {list(expected[k])}"
                                                    for k in misshaped], cap=3))
    if not_tensors:
        problems.append(f"not tensors: {_listed(not_tensors)}")
    if not_float:
        problems.append(f"not floating point: {_listed(not_float)}")
    raise CheckpointError(f"{source}: not the UniAnimate UNet: it looks like {_what_it_is(tensors, keys, expected)}. "
                          f"Found {len(keys)} keys at the {where}: {'; '.join(problems)}. Expected {EXPECTED_FILE}.")


def load_unianimate_checkpoint(path: str | Path, config: UniAnimateConfig | None = None) -> dict[str, torch.Tensor]:
    """The checked UNet tensors of a .pth/.safetensors file (CPU, dtype as stored); `config`
    defaults to the file's own (`config_of`)."""
    return check_state_dict(read_state_dict(path), str(path), config)
