"""GPU check (issue 20 item 9): sampling and training speed and peak VRAM at full size, in <= 8 min.

On one CUDA device, with random weights at SD1.5 + AnimateDiff v2 shapes (train/sd15.py's
configs; the speed and memory of a network do not depend on its weights):
- sampling, fp16: one denoising step = one UNetMotionModel forward over the cond and uncond
  batches of 16 frames at 512x512 (latents 2 x 4 x 16 x 64 x 64); seconds per step and peak VRAM,
  plain vs with the face adapter's 16 processors. The adapter runs the training processors (LoRA
  unmerged, computed at every step), an upper bound of the nodes' cost, which merge the LoRA;
- training, bf16 autocast with the adapter's fp32 masters and AdamW: one optimizer step at batch
  2 x 16 x 512x512 (train/loop.py's step maths, ε-MSE), with and without gradient checkpointing;
  seconds per step and peak VRAM beside what bench/train_step.py counted on the meta device:
  ~51 GB without checkpointing, ~29 GB with (TRAINING.md §4).
Each measurement: `--warmup` untimed runs, then the median of `--steps` timed ones (CUDA
synchronised); peaks from torch.cuda.max_memory_allocated, reset before each.

    python bench/gpu_check.py                       # everything, JSON to bench/results/gpu_check.json
    python bench/gpu_check.py --model tiny --device cpu --steps 1 --warmup 0   # the code path, on CPU
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import train_step  # the UNet, adapter and inputs of the training-step benchmark

COUNTED_GB = {"plain": 51.0, "checkpointing": 29.0}  # bench/train_step.py, TRAINING.md §4
FULL = dict(batch=2, frames=16, latent=64)  # 16 frames at 512x512
TINY = dict(batch=2, frames=4, latent=8)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(run: Callable[[], None], device: torch.device, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of `run` over `steps` timed calls after `warmup`, and the peak memory (GiB,
    CUDA only) over all of them."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        run()
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"s_per_step": statistics.median(seconds), "min_s": min(seconds), "peak_gib": peak}


def sampling(model: str, device: torch.device, size: dict[str, int], steps: int, warmup: int) -> dict[str, Any]:
    """Seconds per denoising step and peak VRAM, fp16, plain vs with the adapter."""
    unet = train_step.build_unet(model, device=str(device)).to(torch.float16)
    adapter = train_step.build_adapter(model, unet, device=str(device)).to(torch.float16)
    x = train_step.inputs(model, batch=size["batch"], frames=size["frames"], latent=size["latent"],
                          device=str(device), dtype=torch.float16)

    @torch.no_grad()
    def plain() -> None:
        unet(x["sample"], x["timestep"], encoder_hidden_states=x["text"])

    @torch.no_grad()
    def with_adapter() -> None:
        adapter(unet, x["sample"], x["timestep"], x["text"], x["features"])

    results = {}
    for name, run in (("plain", plain), ("adapter", with_adapter)):
        if name == "adapter":
            adapter.install(unet)
        else:
            type(adapter).uninstall(unet)
        results[name] = measure(run, device, steps, warmup)
    type(adapter).uninstall(unet)
    del unet, adapter, x
    return results


def training(model: str, device: torch.device, size: dict[str, int], checkpointing: bool, steps: int,
             warmup: int) -> dict[str, Any]:
    """Seconds per optimizer step and peak VRAM: frozen UNet in bf16, adapter fp32 + AdamW, autocast."""
    unet = train_step.build_unet(model, device=str(device)).to(torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    adapter = train_step.build_adapter(model, unet, device=str(device)).to(torch.float32)
    adapter.install(unet)
    optimizer = torch.optim.AdamW([p for p in adapter.parameters() if p.requires_grad], lr=1e-4)
    x = train_step.inputs(model, batch=size["batch"], frames=size["frames"], latent=size["latent"],
                          device=str(device), dtype=torch.float32)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            prediction = adapter(unet, x["sample"], x["timestep"], x["text"], x["features"])
        F.mse_loss(prediction.float(), x["noise"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = measure(step, device, steps, warmup)
    key = "checkpointing" if checkpointing else "plain"
    result["counted_gb"] = COUNTED_GB[key] if model == "sd15" else None
    type(adapter).uninstall(unet)
    del unet, adapter, optimizer, x
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("sd15", "tiny"), default="sd15",
                        help="sd15: the full-size check (default); tiny: the code path at toy size")
    parser.add_argument("--device", default="cuda", help="torch device (default cuda; the check is for a GPU)")
    parser.add_argument("--only", choices=("sampling", "training"), help="run one half")
    parser.add_argument("--steps", type=int, default=5, help="timed runs per measurement (median; default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (default 2)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "gpu_check.json")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.model == "sd15" and not args.device.startswith("cuda"):
        parser.error("the full-size check needs a CUDA device (about 60 GB of VRAM for the training "
                     "half); use --model tiny to run the code path elsewhere")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here (torch.cuda.is_available() is False); run this on a GPU "
                     "machine, or use --model tiny --device cpu")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = torch.device(args.device)
    size = FULL if args.model == "sd15" else TINY
    report: dict[str, Any] = {"command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "machine": common.machine(), "model": args.model, "shape": size,
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    started = time.monotonic()
    if args.only in (None, "sampling"):
        report["sampling_fp16"] = s = sampling(args.model, device, size, args.steps, args.warmup)
        print(f"sampling fp16 {size['frames']}x{size['latent'] * 8}², cond+uncond: plain {s['plain']['s_per_step']:.3f} "
              f"s/step, peak {s['plain']['peak_gib']:.1f} GiB; with the adapter {s['adapter']['s_per_step']:.3f} "
              f"s/step, peak {s['adapter']['peak_gib']:.1f} GiB", flush=True)
    if args.only in (None, "training"):
        report["training_bf16"] = {}
        for checkpointing in (False, True):
            key = "checkpointing" if checkpointing else "plain"
            report["training_bf16"][key] = t = training(args.model, device, size, checkpointing, args.steps,
                                                        args.warmup)
            counted = f" (counted {t['counted_gb']:.0f} GB)" if t["counted_gb"] else ""
            print(f"training step batch {size['batch']}x{size['frames']}x{size['latent'] * 8}², checkpointing "
                  f"{'on' if checkpointing else 'off'}: {t['s_per_step']:.3f} s/step, peak {t['peak_gib']:.1f} GiB"
                  f"{counted}", flush=True)
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
