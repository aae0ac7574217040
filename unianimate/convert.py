"""Convert the official UniAnimate UNet (a 5.67 GB pickle) to a checked .safetensors file (safe to
share, fast to load, optionally fp16: 2.8 GB).

    python -m id_animator.unianimate.convert unianimate_16f_32f_non_ema_223000.pth unianimate.safetensors --dtype fp16
    python -m unianimate.convert IN.pth OUT.safetensors   # from the pack folder

Reads with the pack's safe reader (torch.load(weights_only=True) on the opened file), checks every
key and shape (unianimate.checkpoint), writes, reads the result back and checks that every tensor
is identical. Exit status: 0 written and verified, 1 bad input file or failed check, 2 usage error.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..adapter.convert import conversion_cli
from ..adapter.weights_file import write_verified
from .checkpoint import load_unianimate_checkpoint


def convert(source: Path, target: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load and check `source`, write `target` (re-read and compared tensor for tensor before it
    takes its name: `weights_file.write_verified`), and check the written file as a loader would."""
    state = load_unianimate_checkpoint(source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_verified(target, state, metadata={"format": "pt", "source": Path(source).name})
    return load_unianimate_checkpoint(target)


def main(argv: list[str] | None = None) -> int:
    def convert_file(source: Path, target: Path, dtype: torch.dtype | None) -> str:
        written = convert(source, target, dtype)
        return f"{len(written)} tensors, {sum(t.numel() for t in written.values()):,} parameters"

    return conversion_cli(
        argv, prog="python -m id_animator.unianimate.convert",
        description="Check a UniAnimate UNet file and write it as .safetensors.",
        source_help="unianimate_16f_32f_non_ema_223000.pth (or a .safetensors)",
        dtype_help="cast the tensors (default: keep the file's dtype; fp16 halves the size)",
        convert_file=convert_file)


if __name__ == "__main__":
    sys.exit(main())
