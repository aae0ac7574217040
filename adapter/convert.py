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
from pathlib import Path

import torch

from .checkpoint import AdapterWeights, describe, load_adapter_checkpoint, save_adapter_safetensors
from .errors import CheckpointError

DTYPES = {"keep": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _differences(expected: AdapterWeights, actual: AdapterWeights) -> list[str]:
    """Names of tensors that did not survive the round trip bit for bit."""
    pairs = [(f"image_proj.{k}", t, actual.resampler.get(k)) for k, t in expected.resampler.items()]
    pairs += [(f"face_adapter.{i}.{k}", t, actual.layers.get(i, {}).get(k))
              for i, layer in expected.layers.items() for k, t in layer.items()]
    return [name for name, a, b in pairs
            if b is None or a.dtype != b.dtype or not torch.equal(a, b)]


def convert(source: Path, target: Path, dtype: torch.dtype | None = None) -> AdapterWeights:
    """Load and validate `source`, write `target`, re-read it and verify identical tensors."""
    weights = load_adapter_checkpoint(source)
    if dtype is not None:
        weights = weights.to(dtype)
    save_adapter_safetensors(weights, target)
    written = load_adapter_checkpoint(target)
    different = _differences(weights, written)
    if different:
        raise CheckpointError(f"{target}: verification failed, {len(different)} tensors differ after "
                              f"writing (first: {different[0]}); the disk may be full or failing.")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m id_animator.adapter.convert",
        description="Validate an ID-Animator adapter checkpoint and write it as .safetensors.")
    parser.add_argument("source", type=Path, help="animator.ckpt (or .pt/.pth/.bin/.safetensors)")
    parser.add_argument("target", type=Path, help="output file, ending in .safetensors")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="keep",
                        help="cast the tensors (default: keep the file's dtype)")
    args = parser.parse_args(argv)
    if args.target.suffix.lower() != ".safetensors":
        parser.error(f"the output file must end in .safetensors, got {args.target.name}")
    try:
        written = convert(args.source, args.target, DTYPES[args.dtype])
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    size = args.target.stat().st_size
    print(f"wrote {args.target}: {describe(written)}, {size:,} bytes on disk, verified identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
