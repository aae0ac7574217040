"""Memory with frames: peak resident memory of a sampling run at 16, 32 and 64 frames, with core
ContextWindowsManual (length 16, overlap 4) and without windows.

Every configuration runs in a fresh subprocess (so no run inherits another's allocator pools):
it starts ComfyUI, loads the SD1.5 UNet and the adapter, applies ApplyFaceAdapter (and the
windows), then records its resident size (VmRSS), resets the kernel's high-water mark
(/proc/self/clear_refs = 5) and samples; the peak (VmHWM) minus the resident size before
sampling is what sampling itself needed. One plain (no adapter) run per mode gives the adapter's
share. The adapter's own tensors are counted directly: face K/V of the 16 patches, and the copy
of the 64 attn2 weights ComfyUI keeps to restore them after the merged LoRA.

    python bench/memory.py                     # 32x32 latents, 1 step, cfg 2
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from report import call_batches

WINDOW = {"context_length": 16, "context_overlap": 4, "context_schedule": "standard_static",
          "context_stride": 1, "closed_loop": False, "fuse_method": "pyramid", "dim": 0, "freenoise": False,
          "causal_window_fix": False}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    """Start a new high-water mark at the current resident size (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def adapter_tensor_bytes(model) -> dict[str, int]:
    """Face K/V held by our patches, and the attn2 weights ComfyUI backed up before merging the LoRA."""
    patches = model.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
    face_kv = sum(t.numel() * t.element_size() for p in patches.values()
                  for t in (p.face_keys, p.face_values, p.uncond_keys, p.uncond_values))
    return {"face_kv": face_kv, "patches": len(patches)}


def lora_backup_bytes(model) -> int:
    return sum(b.weight.numel() * b.weight.element_size() for b in model.backup.values())


def child(frames: int, windows: bool, adapter: bool, latent: int, device: str, attention: str) -> dict:
    """One configuration, in this (fresh) process."""
    session = common.start_comfy(device, attention)
    from support.graphs import ADAPTER, UNET

    torch.set_num_threads(os.cpu_count() or 1)  # memory, not time: use every core
    model = session.comfy.nodes.UNETLoader().load_unet(UNET, "default")[0]
    sizes: dict[str, int] = {}
    if adapter:
        checkpoint = session.sub("adapter.checkpoint")
        identity = session.sub("adapter.identity")
        types = session.sub("nodes.types")
        folders = session.sub("nodes.folders")
        path = session.comfy.folder_paths.get_full_path_or_raise(folders.ADAPTER_FOLDER, ADAPTER)
        weights = checkpoint.load_adapter_checkpoint(path)
        sizes["adapter_weights"] = sum(t.numel() * t.element_size() for t in weights.tensors())
        # ApplyFaceAdapter reads only the weights from the bundle; the CLIP vision tower and the
        # detector (FaceEncode's) are left out so the numbers are the sampling side's.
        ida = types.IDAnimator(ADAPTER, weights, None, None, None)
        gen = torch.Generator().manual_seed(0)
        embeds = identity.single_identity(torch.randn(1, 16, 768, generator=gen), torch.randn(16, 768, generator=gen))
        model = common.apply_adapter(session, model, ida, embeds)
        sizes.update(adapter_tensor_bytes(model))
    if windows:
        model = session.nodes["ContextWindowsManual"].execute(model, **WINDOW).args[0]
    # the batch of each UNet call: shows whether ComfyUI split cond/uncond (it does when its
    # free-memory estimate is short), which changes the peak as much as the frame count does
    model, calls = common.record_unet_inputs(model)
    before = status_kib("VmRSS")
    reset_peak()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        common.sample(session, model, frames=frames, size=latent * 8, steps=1, cfg=2.0)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = status_kib("VmHWM")
    if adapter:
        sizes["lora_backup"] = lora_backup_bytes(model)
    if device == "cuda":
        sizes["cuda_peak_allocated"] = torch.cuda.max_memory_allocated()
    return {"frames": frames, "windows": windows, "adapter": adapter, "latent": latent,
            "rss_before_mib": before / 1024, "peak_mib": peak / 1024, "sampling_mib": (peak - before) / 1024,
            "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "unet_call_batches": [shape[0] for shape in calls], "sample_wall_s": wall, "sample_cpu_s": cpu,
            "load_average_1min": common.load_average(),
            "adapter_bytes": sizes, "comfy_attention": common.comfy_attention()}


CONFIGS = [(frames, windows, True) for windows in (True, False) for frames in (16, 32, 64)]
CONFIGS += [(16, True, False), (64, True, False), (16, False, False)]  # the adapter's share


def main() -> None:
    parser = common.base_arguments(__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32, help="latent size (pixels / 8)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="only these frame counts")
    parser.add_argument("--child", nargs=3, metavar=("FRAMES", "WINDOWS", "ADAPTER"), help=argparse_hidden())
    args = parser.parse_args()
    if args.child:
        frames, windows, adapter = int(args.child[0]), args.child[1] == "1", args.child[2] == "1"
        result = child(frames, windows, adapter, args.latent, args.device, args.attention)
        print("RESULT " + json.dumps(result), flush=True)
        return
    configs = [c for c in CONFIGS if args.frames is None or c[0] in args.frames]
    results = []
    for frames, windows, adapter in configs:
        print(f"{frames} frames, windows {'on' if windows else 'off'}, adapter {'on' if adapter else 'off'} ...",
              flush=True)
        cmd = [sys.executable, __file__, "--child", str(frames), str(int(windows)), str(int(adapter)),
               "--latent", str(args.latent), "--device", args.device,
               "--attention", args.attention]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            sys.exit(f"configuration failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT "):]))
        r = results[-1]
        print(f"  before {r['rss_before_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB, sampling "
              f"+{r['sampling_mib']:.0f} MiB, {r['sample_cpu_s']:.0f} s CPU (load {r['load_average_1min']})",
              flush=True)
    print_summary(results)
    machine = {**common.machine(args.device), "comfy_attention": results[0]["comfy_attention"]}
    common.write_json("memory", {"machine": machine, "latent": args.latent, "steps": 1,
                                 "cfg": 2.0, "window": WINDOW, "results": results}, args.out, args.device)


def print_summary(results: list[dict]) -> None:
    def find(frames, windows, adapter):
        return next((r for r in results if (r["frames"], r["windows"], r["adapter"]) == (frames, windows, adapter)),
                    None)

    rows = []
    for r in results:
        first = find(16, r["windows"], r["adapter"])
        growth = f"{r['peak_mib'] / first['peak_mib']:.3f}" if first else "-"
        sampling_growth = f"{r['sampling_mib'] / first['sampling_mib']:.2f}" if first and first["sampling_mib"] else "-"
        rows.append([r["frames"], "on" if r["windows"] else "off", "on" if r["adapter"] else "off",
                     round(r["rss_before_mib"]), round(r["peak_mib"]), round(r["sampling_mib"]), growth,
                     sampling_growth, call_batches(r), r["load_average_1min"]])
    common.print_table("Peak resident memory of one sampling run (MiB)",
                       ["frames", "windows", "adapter", "before", "peak", "sampling", "peak / 16 frames",
                        "sampling / 16 frames", "UNet calls", "load 1min"], rows)


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
