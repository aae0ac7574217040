"""UniAnimate UNet: one evaluation of ours (`unianimate.unet.UniAnimateUNet`) against the official
`UNetSD_UniAnimate` (imported from its repository, tests/support/unianimate_official.py), on the
same random weights, the same inputs and the same size, in one run (issue 21, item 7).

- Size: the official structure at a reduced width (--dim, default 128: every level, attention
  scale, temporal layer and adapter of the 320-wide model), a batch of 2 (a cond/uncond pair),
  every condition given (pose with the reference pose, reference latent, local image, CLIP image
  embedding), fp32 on CPU.
- Time: process CPU seconds per evaluation, one torch thread, the two models alternated with
  the order rotated each round after one warm-up (bench/common.py), median and min-max, and the
  median of the per-round ratios. The outputs are compared too (relative error).
- Memory: each model's evaluation runs once more in a fresh subprocess (no allocator pools
  inherited): its resident size after building the model and the inputs, the kernel's
  high-water mark reset there (/proc/self/clear_refs = 5), then the peak (VmHWM) minus that
  resident size is what the evaluation itself needed (glibc's mmap threshold fixed at 64 KiB, so
  freed big blocks leave the resident size: FIXED_MMAP).

    python bench/unianimate_unet.py --rounds 5      # width 128, 4 frames, 128x128 pixels
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from support.unianimate_official import official_unet

# the pure packages of this checkout as id_animator.* (tests/conftest.py does it on import)
from id_animator.unianimate.config import UniAnimateConfig  # noqa: E402
from id_animator.unianimate.unet import UniAnimateUNet  # noqa: E402

# Every allocation of 64 KiB or more gets its own mapping, returned to the system when freed, so
# the high-water mark follows the live tensors. glibc's default moves that threshold up to 32 MiB
# after big frees (the child frees the model it does not measure): later allocations then reuse
# freed heap the mark already counts, and one run measured 19 MiB against 112 MiB that way.
FIXED_MMAP = {"MALLOC_MMAP_THRESHOLD_": "65536"}
KEYS = {"dwpose": "pose", "randomref": "reference_latent", "local_image": "local_image", "image": "image_embed"}


def build(dim: int, size: int) -> tuple[torch.nn.Module, UniAnimateUNet, torch.Tensor]:
    """(official, ours, zero_y) with the same random weights."""
    gen = torch.Generator().manual_seed(0)
    zero_y = torch.randn(1, 77, 1024, generator=gen)
    official = official_unet(common.PATHS["cache"], (size, size), zero_y=zero_y, dim=dim)
    with torch.no_grad():
        for p in official.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (p[0].numel() ** -0.5 if p.ndim > 1 else 0.1))
    ours = UniAnimateUNet(UniAnimateConfig(dim=dim)).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours, zero_y


def inputs(batch: int, frames: int, size: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    h = size // 8
    return {"x": torch.randn(batch, 4, frames, h, h, generator=gen), "t": torch.tensor([991.0, 34.0][:batch]),
            "dwpose": torch.rand(batch, 3, frames + 1, size, size, generator=gen),
            "randomref": torch.randn(batch, 4, frames, h, h, generator=gen),
            "local_image": torch.rand(batch, 3, frames, size, size, generator=gen),
            "image": torch.randn(batch, 1, 1024, generator=gen)}


def evaluations(official, ours, zero_y, data):
    """name -> a call of one evaluation with every condition given."""
    conditions = {k: data[k] for k in KEYS}

    def run_official():
        with torch.no_grad():
            return official(data["x"], data["t"], **conditions)

    def run_ours():
        with torch.no_grad():
            return ours(data["x"], data["t"], zero_y=zero_y, **{KEYS[k]: v for k, v in conditions.items()})

    return {"official": run_official, "ours": run_ours}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory(variant: str, dim: int, frames: int, size: int) -> None:
    """(in the subprocess) print {"before_mib", "peak_mib", "evaluation_mib"} for one evaluation."""
    torch.set_num_threads(1)
    official, ours, zero_y = build(dim, size)
    run = evaluations(official if variant == "official" else None, ours if variant == "ours" else None,
                      zero_y, inputs(2, frames, size))[variant]
    del official, ours  # only the measured model stays resident (held by `run`)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    peak = _status_kib("VmHWM")
    print(json.dumps({"before_mib": before / 1024, "peak_mib": peak / 1024, "evaluation_mib": (peak - before) / 1024}))


def main() -> None:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="pose/reference image size in pixels (latent = size/8)")
    parser.add_argument("--memory-child", choices=("official", "ours"), help=argparse_hidden())
    args = parser.parse_args()
    if args.memory_child:
        measure_memory(args.memory_child, args.dim, args.frames, args.size)
        return
    common.set_threads(args.threads)
    official, ours, zero_y = build(args.dim, args.size)
    data = inputs(2, args.frames, args.size)
    variants = evaluations(official, ours, zero_y, data)
    expected, got = variants["official"](), variants["ours"]()
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    rounds = common.alternate(variants, args.rounds)
    del official, ours
    memory = {}
    for variant in ("official", "ours"):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **FIXED_MMAP)
        out = subprocess.run([sys.executable, __file__, "--memory-child", variant, "--dim", str(args.dim),
                              "--frames", str(args.frames), "--size", str(args.size)],
                             check=True, capture_output=True, text=True, env=env).stdout
        memory[variant] = json.loads(out.strip().splitlines()[-1])
    time_ratio = rounds.ratio("ours", "official")
    memory_ratio = memory["ours"]["evaluation_mib"] / memory["official"]["evaluation_mib"]
    common.write_json("unianimate_unet", {
        "config": {"dim": args.dim, "frames": args.frames, "size": args.size, "batch": 2, "rounds": args.rounds},
        "relative_error": error, "rounds": rounds.as_json(), "time_ratio": time_ratio, "memory": memory,
        "memory_ratio": memory_ratio, "machine": common.machine()}, args.out)
    s_off, s_ours = rounds.stats("official"), rounds.stats("ours")
    loads = f"{min(rounds.loads)}-{max(rounds.loads)}"
    print(f"| UniAnimate UNet, one evaluation (dim {args.dim}, batch 2, {args.frames} frames, {args.size}x{args.size}, "
          f"all conditions, fp32 CPU) | official {s_off['median']:.2f} s ({s_off['min']:.2f}-{s_off['max']:.2f}), "
          f"ours {s_ours['median']:.2f} s ({s_ours['min']:.2f}-{s_ours['max']:.2f}): "
          f"{time_ratio['median']:.3f}x ({time_ratio['min']:.3f}-{time_ratio['max']:.3f}); "
          f"evaluation memory official {memory['official']['evaluation_mib']:.0f} MiB, "
          f"ours {memory['ours']['evaluation_mib']:.0f} MiB: {memory_ratio:.3f}x; rel. error {error:.1e} | load {loads} |")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
