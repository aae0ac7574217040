"""Convert animator.ckpt to a validated .safetensors file (safe to share, fast to load).

    python -m id_animator.adapter.convert animator.ckpt animator.safetensors
    python -m adapter.convert animator.ckpt animator.safetensors   # from the pack folder

Loads with the safe reader (safetensors / torch.load weights_only=True), checks every key and
shape, writes the flat layout, reads the result back and checks every tensor is identical.
Exit status: 0 written and verified, 1 bad input file or failed check, 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import AdapterWeights, describe, load_adapter_checkpoint, save_adapter_safetensors
from .errors import CheckpointError
from .weights_file import DTYPES


def convert(source: Path, target: Path, dtype: torch.dtype | None = None) -> AdapterWeights:
    """Load and validate `source`, write `target` (re-read and compared tensor for tensor before
    it takes its name: `weights_file.write_verified`)."""
    weights = load_adapter_checkpoint(source)
    if dtype is not None:
        weights = weights.to(dtype)
    save_adapter_safetensors(weights, target)
    return weights


def conversion_cli(argv: list[str] | None, *, prog: str, description: str, source_help: str, dtype_help: str,
                   convert_file: Callable[[Path, Path, torch.dtype | None], str]) -> int:
    """The command line every converter of the pack shares (this one and unianimate.convert):
    SOURCE TARGET.safetensors [--dtype]; `convert_file` writes and returns what it wrote, in words."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("source", type=Path, help=source_help)
    parser.add_argument("target", type=Path, help="output file, ending in .safetensors")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep", help=dtype_help)
    args = parser.parse_args(argv)
    if args.target.suffix.lower() != ".safetensors":
        parser.error(f"the output file must end in .safetensors, got {args.target.name}")
    try:
        written = convert_file(args.source, args.target, DTYPES.get(args.dtype))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}: {written}, {args.target.stat().st_size:,} bytes on disk, verified identical")
    return 0


def main(argv: list[str] | None = None) -> int:
    return conversion_cli(
        argv, prog="python -m id_animator.adapter.convert",
        description="Validate an ID-Animator adapter checkpoint and write it as .safetensors.",
        source_help="animator.ckpt (or .pt/.pth/.bin/.safetensors)",
        dtype_help="cast the tensors (default: keep the file's dtype)",
        convert_file=lambda source, target, dtype: describe(convert(source, target, dtype)))


if __name__ == "__main__":
    sys.exit(main())
