"""Convert the official UniAnimate UNet (a 5.67 GB pickle) to a checked .safetensors file (safe to
share, fast to load, optionally fp16: 2.8 GB).

    python -m id_animator.unianimate.convert unianimate_16f_32f_non_ema_223000.pth unianimate.safetensors --dtype fp16
    python -m unianimate.convert IN.pth OUT.safetensors   # from the pack folder

Reads with the pack's safe reader (torch.load(weights_only=True) on the opened file), checks every
key and shape (unianimate.checkpoint), writes, reads the result back and checks that every tensor
is identical. Exit status: 0 written and verified, 1 bad input file or failed check, 2 usage error.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..adapter.weights_file import DTYPES, write_verified
from .checkpoint import load_unianimate_checkpoint
from .errors import CheckpointError


def convert(source: Path, target: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Load and check `source`, write `target` (re-read and compared tensor for tensor before it
    takes its name: `weights_file.write_verified`), and check the written file as a loader would."""
    state = load_unianimate_checkpoint(source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    write_verified(target, state, metadata={"format": "pt", "source": Path(source).name})
    return load_unianimate_checkpoint(target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m id_animator.unianimate.convert",
                                     description="Check a UniAnimate UNet file and write it as .safetensors.")
    parser.add_argument("source", type=Path, help="unianimate_16f_32f_non_ema_223000.pth (or a .safetensors)")
    parser.add_argument("target", type=Path, help="output file, ending in .safetensors")
    parser.add_argument("--dtype", choices=["keep", *DTYPES], default="keep",
                        help="cast the tensors (default: keep the file's dtype; fp16 halves the size)")
    args = parser.parse_args(argv)
    if args.target.suffix.lower() != ".safetensors":
        parser.error(f"the output file must end in .safetensors, got {args.target.name}")
    try:
        written = convert(args.source, args.target, DTYPES.get(args.dtype))
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}: {len(written)} tensors, {sum(t.numel() for t in written.values()):,} parameters, "
          f"{args.target.stat().st_size:,} bytes, verified identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
