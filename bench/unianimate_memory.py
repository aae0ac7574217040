"""UniAnimate memory with frames: peak resident memory of one KSampler step on a UniAnimate MODEL
at 16, 32 and 64 frames, with UniAnimate Context Windows (length 16, overlap 4) and without
(issue 21, item 7: "memory at 32 frames with windows vs without").

Every configuration runs in a fresh subprocess (no allocator pools inherited): it starts ComfyUI,
builds the pack's UniAnimate MODEL (`nodes.unianimate_model.build_model`, fp32) at a reduced
width (--dim, default 128: every level, attention, temporal layer and pose adapter of the 320-wide
model) with random weights, and the conditioning UniAnimateConditioning gives (the pose frames
with the reference pose, the reference latent, the CLIP image embedding; the negative carries
none, the official unconditional branch); then it records its resident size (VmRSS), resets the
kernel's high-water mark (/proc/self/clear_refs = 5) and samples one step, cfg 2.5, euler +
ddim_uniform, from the noise-prior latent. The peak (VmHWM) minus the resident size before is
what sampling itself needed. Every UNet call's frame count is recorded: a windowed run calls the
UNet per window (each with the reference frame prepended inside the model).

    python bench/unianimate_memory.py                  # width 128, 32x32 latents (256x256 px)
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from memory import reset_peak, status_kib

WINDOW = {"context_length": 16, "context_overlap": 4}
CONFIGS = [(frames, windows) for windows in (True, False) for frames in (16, 32, 64)]


def child(frames: int, windows: bool, dim: int, latent: int) -> dict:
    """One configuration, in this (fresh) process."""
    session = common.start_comfy("cpu")
    from comfy import sample as comfy_sample

    config_mod, unet_mod = session.sub("unianimate.config"), session.sub("unianimate.unet")
    model_mod, prior = session.sub("nodes.unianimate_model"), session.sub("unianimate.noise_prior")
    torch.set_num_threads(os.cpu_count() or 1)  # memory, not time: use every core
    torch.manual_seed(0)
    config = config_mod.UniAnimateConfig(dim=dim)
    model = model_mod.build_model(unet_mod.UniAnimateUNet(config).state_dict(), config, torch.float32)
    if windows:
        model = session.nodes["UniAnimateContextWindows"].execute(model, **WINDOW).args[0]

    model, calls = common.record_unet_inputs(model)  # [batch, 4, frames, h, w] each
    gen = torch.Generator().manual_seed(1)
    pixels = latent * 8
    zero_y = torch.randn(1, 77, 1024, generator=gen)
    positive = [[zero_y, {model_mod.POSE_COND: torch.rand(1, 3, frames + 1, pixels, pixels, generator=gen),
                          model_mod.REFERENCE_COND: torch.randn(1, 4, 1, latent, latent, generator=gen),
                          model_mod.IMAGE_COND: torch.randn(1, 1, 1024, generator=gen)}]]
    negative = [[zero_y.clone(), {}]]
    reference = positive[0][1][model_mod.REFERENCE_COND]
    x_init = prior.noise_prior(reference, torch.randn(1, 4, frames, latent, latent, generator=gen),
                               torch.randn(1, 4, frames, 1, 1, generator=gen))
    start_latent = prior.starting_latent(x_init, prior.ddim_timesteps(30)[0])

    before = status_kib("VmRSS")
    reset_peak()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        samples = comfy_sample.sample(model, torch.zeros_like(start_latent), 30, 2.5, "euler", "ddim_uniform",
                                      positive, negative, start_latent, disable_noise=True, start_step=0,
                                      last_step=1, force_full_denoise=False, disable_pbar=True, seed=0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = status_kib("VmHWM")
    if not torch.isfinite(samples).all():
        raise RuntimeError("the sampled latent is not finite")
    return {"frames": frames, "windows": windows, "dim": dim, "latent": latent,
            "rss_before_mib": before / 1024, "peak_mib": peak / 1024, "sampling_mib": (peak - before) / 1024,
            "unet_call_frames": [shape[2] for shape in calls], "sample_wall_s": wall, "sample_cpu_s": cpu,
            "load_average_1min": common.load_average()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=128, help="UNet base width (the official model: 320)")
    parser.add_argument("--latent", type=int, default=32, help="latent size (pixels / 8)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="only these frame counts")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/)")
    parser.add_argument("--child", nargs=2, metavar=("FRAMES", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(int(args.child[0]), args.child[1] == "1", args.dim, args.latent)
        print("RESULT " + json.dumps(result), flush=True)
        return
    results = []
    for frames, windows in (c for c in CONFIGS if args.frames is None or c[0] in args.frames):
        print(f"{frames} frames, windows {'on' if windows else 'off'} ...", flush=True)
        cmd = [sys.executable, __file__, "--child", str(frames), str(int(windows)), "--dim", str(args.dim),
               "--latent", str(args.latent)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"configuration failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(r := json.loads(line[len("RESULT "):]))
        print(f"  before {r['rss_before_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB, sampling "
              f"+{r['sampling_mib']:.0f} MiB, UNet calls of {sorted(set(r['unet_call_frames']))} frames, "
              f"{r['sample_cpu_s']:.0f} s CPU", flush=True)
    rows = []
    for r in results:
        first = next((b for b in results if (b["frames"], b["windows"]) == (16, r["windows"])), None)
        rows.append([r["frames"], "on" if r["windows"] else "off", round(r["rss_before_mib"]), round(r["peak_mib"]),
                     round(r["sampling_mib"]), f"{r['sampling_mib'] / first['sampling_mib']:.2f}" if first else "-",
                     len(r["unet_call_frames"]), r["load_average_1min"]])
    common.print_table(f"UniAnimate, one step, width {args.dim}, {args.latent * 8}x{args.latent * 8} px (MiB)",
                       ["frames", "windows", "before", "peak", "sampling", "sampling / 16 frames", "UNet calls",
                        "load 1min"], rows)
    common.write_json("unianimate_memory", {"machine": common.machine("cpu"), "dim": args.dim, "latent": args.latent,
                                            "steps": 1, "cfg": 2.5, "window": WINDOW, "results": results}, args.out)


if __name__ == "__main__":
    main()
