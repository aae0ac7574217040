"""The trained adapter as `animator.ckpt` (official layout) and `animator.safetensors`, verified.

`animator.ckpt` is `torch.save({"state_dict": {image_proj_model.*, adapter_modules.*}})`, the
first container the official loader accepts (official §3.1); the `.safetensors` twin is the flat
layout `save_adapter_safetensors` writes. Both go through `adapter.weights_file.write_verified`
(temporary name, fsync, re-read, bit-for-bit comparison), as `adapter.convert` does, into staged
names, and take their final names only when both are verified: a failed export leaves no half
file behind.

Command: `python -m id_animator.train export SOURCE [--out DIR] [--dtype fp16]`, where SOURCE is a
training state (`RUN_DIR/state/step-N`, written by accelerate's `save_state`), a RUN_DIR (its
latest state), or any adapter file.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter.checkpoint import (
    AdapterWeights, describe, official_state_dict, parse_adapter_state, read_adapter_file,
    save_adapter_ckpt, save_adapter_safetensors)
from ..adapter.errors import CheckpointError, TrainingError
from ..adapter.weights_file import DTYPES, read_state_dict

logger = logging.getLogger(__name__)

# accelerate 1.15 save_state: the first prepared model as model.safetensors (safe_serialization,
# the default) or pytorch_model.bin; DeepSpeed writes its engine checkpoint in pytorch_model/.
STATE_MODEL_FILES = ("model.safetensors", "pytorch_model.bin")
DEEPSPEED_MODEL_FILE = Path("pytorch_model") / "mp_rank_00_model_states.pt"
_STEP = re.compile(r"step-(\d+)$")


@dataclass(frozen=True)
class ExportResult:
    ckpt: Path
    safetensors: Path
    summary: str  # tensors, parameters, dtypes, size


def _adapter_weights(adapter: Any) -> tuple[AdapterWeights, dict[str, tuple[int, ...]]]:
    """(weights, expected shape table) of a FaceAdapter (or a wrapper's module) or AdapterWeights."""
    from .model import AdapterConfig

    if isinstance(adapter, AdapterWeights):
        config = AdapterConfig.from_state_dict(official_state_dict(adapter, "flat"))
        return adapter, config.shapes
    module = getattr(adapter, "module", adapter)  # DDP left wrapped
    module = getattr(module, "_orig_mod", module)  # torch.compile
    if not hasattr(module, "to_weights"):
        raise TrainingError(f"export_adapter takes a FaceAdapter or AdapterWeights, not {type(adapter).__name__}.")
    return module.to_weights(), module.config.shapes


def export_adapter(adapter: Any, out_dir: str | Path, name: str = "animator", *,
                   dtype: torch.dtype | None = None) -> ExportResult:
    """Write `<out_dir>/<name>.ckpt` (official layout) and `<name>.safetensors`, verified.

    `adapter`: a FaceAdapter (DDP-wrapped or not) or AdapterWeights; `dtype` casts every tensor
    (None keeps the adapter's, fp32 in training). Raises CheckpointError when a file does not read
    back bit-equal; then neither file is there (a previous export of the same name stays as it was).
    """
    weights, expected = _adapter_weights(adapter)
    weights = AdapterWeights(
        resampler={k: t.detach().to("cpu", dtype).contiguous().clone() for k, t in weights.resampler.items()},
        layers={i: {k: t.detach().to("cpu", dtype).contiguous().clone() for k, t in layer.items()}
                for i, layer in weights.layers.items()})
    # the same checks a reader makes (names, shapes, finite values): a diverged run is refused here
    parse_adapter_state(official_state_dict(weights, "flat"), f"the adapter to export as {name}", expected)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = {suffix: out_dir / f"{name}{suffix}" for suffix in (".ckpt", ".safetensors")}
    # staged under names that keep the real suffix (the reader's format checks read right)
    staged = {suffix: out_dir / f".{name}.staged{suffix}" for suffix in final}
    try:
        save_adapter_ckpt(weights, staged[".ckpt"])
        save_adapter_safetensors(weights, staged[".safetensors"])
        for suffix, path in staged.items():
            os.replace(path, final[suffix])
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    summary = describe(weights)
    from .model import AdapterConfig

    if dict(expected) != AdapterConfig.sd15().shapes:
        logger.warning("%s holds an adapter for a non-SD1.5 model (%s); LoadIDAnimator reads only "
                       "SD1.5 adapters.", final[".ckpt"], summary)
    return ExportResult(ckpt=final[".ckpt"], safetensors=final[".safetensors"], summary=summary)


# ---------------------------------------------------------------------------------------------
# Finding the adapter in a training state


def latest_state(folder: Path) -> Path | None:
    """The highest `step-N` folder in `folder` or in `folder/state` (a RUN_DIR), else None."""
    for root in (folder, folder / "state"):
        steps = [(int(m.group(1)), p) for p in root.glob("step-*")
                 if p.is_dir() and (m := _STEP.search(p.name))]
        if steps:
            return max(steps)[1]
    return None


def state_model_file(state_dir: Path) -> Path:
    """The adapter file accelerate's save_state wrote in `state_dir`."""
    for name in (*STATE_MODEL_FILES, DEEPSPEED_MODEL_FILE):
        if (state_dir / name).is_file():
            return state_dir / name
    raise TrainingError(
        f"{state_dir} holds no adapter weights: expected {' or '.join(STATE_MODEL_FILES)} (written by "
        f"accelerate's save_state), or {DEEPSPEED_MODEL_FILE} (DeepSpeed). Give a "
        f"RUN_DIR/state/step-N folder, a RUN_DIR, or an adapter file.")


def read_adapter(source: Path) -> tuple[AdapterWeights, Path]:
    """(weights, the file they came from) for a state folder, RUN_DIR or adapter file."""
    from .model import AdapterConfig

    if not source.exists():
        raise TrainingError(f"{source}: no such file or folder. Give a training state "
                            f"(RUN_DIR/state/step-N), a RUN_DIR, or an adapter file.")
    from_state = source.is_dir()
    if from_state:
        state_dir = source if any((source / n).exists() for n in (*STATE_MODEL_FILES, DEEPSPEED_MODEL_FILE)) \
            else latest_state(source)
        if state_dir is None:
            raise TrainingError(f"{source} is neither a training state (model.safetensors inside) nor "
                                f"a RUN_DIR with state/step-N folders.")
        source = state_model_file(state_dir)
    # an adapter file given directly reads exactly as LoadIDAnimator reads it (same messages)
    state: Mapping[str, Any] = read_state_dict(source) if from_state else read_adapter_file(source)
    if source.name == DEEPSPEED_MODEL_FILE.name and isinstance(state.get("module"), Mapping):
        state = state["module"]
    try:
        config = AdapterConfig.from_state_dict(state.get("state_dict", state))
    except (CheckpointError, TrainingError):
        config = AdapterConfig.sd15()  # then the SD1.5 reader says what the file is
    return parse_adapter_state(state, str(source), expected=config.shapes), source


def _default_out(model_file: Path) -> Path | None:
    """RUN_DIR/exports/step-N for a file inside RUN_DIR/state/step-N."""
    for folder in model_file.parents:
        if _STEP.search(folder.name) and folder.parent.name == "state":
            return folder.parent.parent / "exports" / folder.name
    return None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", type=Path,
                        help="a training state (RUN_DIR/state/step-N), a RUN_DIR (its latest state), "
                             "or an adapter file (.ckpt/.bin/.safetensors) to re-write")
    parser.add_argument("--out", type=Path,
                        help="folder to write into (default for a state: RUN_DIR/exports/step-N)")
    parser.add_argument("--name", default="animator", help="file name stem (default: animator)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32",
                        help="tensor type of the files: fp32 (as trained, ~247 MB), fp16 or bf16 (~124 MB)")


def run(args: argparse.Namespace) -> int:
    weights, model_file = read_adapter(args.source)
    out = args.out or _default_out(model_file)
    if out is None:
        raise TrainingError(f"{args.source} is not inside RUN_DIR/state/step-N: say where to write "
                            f"with --out DIR.")
    result = export_adapter(weights, out, args.name, dtype=DTYPES[args.dtype])
    print(f"exported {model_file} -> {result.ckpt} and {result.safetensors} "
          f"({result.summary}); both re-read and bit-equal")
    return 0
