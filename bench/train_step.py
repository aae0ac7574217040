"""Training step: what the face adapter adds to a step of the frozen video UNet, and its memory.

One training step of `train/loop.py`'s maths (noisy latents -> UNetMotionModel with the adapter's
16 attn2 processors -> ε-MSE -> backward into the adapter) against the floor the adapter cannot
go below: the same frozen UNet's forward + backward (gradients flowing to its input, so backward
crosses the whole network as ours does) with the face branch and the LoRA off. Both run on the
same model object in one process, alternated with the order rotated each round (one torch
thread, process CPU time, median of the rounds; bench/common.py's method). The FLOP counts of
both (torch's FlopCounterMode) predict their ratio: the goal is a measured ratio within 1.05x of
that prediction, i.e. the adapter costs what its arithmetic costs.

Memory: the bytes of every tensor storage alive during a step, counted op by op (a dispatch
mode; the same count runs on real CPU tensors and on the meta device), with and without gradient
checkpointing; at the reduced size beside the process's measured peak (VmHWM), at full size
(16 x 512 x 512, batch 2, bf16) on the meta device. Fixed costs (frozen weights in bf16, the
adapter's fp32 weights, gradients and AdamW states) are counted from the parameters.

Models: `tiny` (training.md §5) and `sd15` (SD1.5 + AnimateDiff v2 widths, random weights built
from train/sd15.py's configs; 1.31 B parameters, ~5.3 GB at fp32).

    python bench/train_step.py --model tiny sd15        # 7 rounds each
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import argparse
import contextlib
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from id_animator.train.model import AdapterConfig, FaceAdapter, ResamplerConfig
from support import tiny_models

SIZES = {  # model: (frames, latent side, clip feature width, tokens, text width)
    "tiny": dict(frames=4, latent=8, features=tiny_models.FEATURES, tokens=257, context=tiny_models.CONTEXT),
    "sd15": dict(frames=4, latent=16, features=1280, tokens=257, context=768),
}


def build_unet(model: str, device: str = "cpu") -> torch.nn.Module:
    from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel

    torch.manual_seed(0)
    with torch.device(device):
        if model == "tiny":
            unet = tiny_models.tiny_unet()
        else:
            from id_animator.train.sd15 import MOTION_ADAPTER_CONFIG, SD15_UNET_CONFIG

            unet = UNetMotionModel.from_unet2d(UNet2DConditionModel(**SD15_UNET_CONFIG),
                                               MotionAdapter(**MOTION_ADAPTER_CONFIG))
    return unet.requires_grad_(False).eval()


def build_adapter(model: str, unet: torch.nn.Module, device: str = "cpu") -> FaceAdapter:
    torch.manual_seed(1)
    if model == "tiny":
        config = AdapterConfig.from_unet(unet, rank=tiny_models.RANK, resampler=ResamplerConfig(
            **tiny_models.RESAMPLER, embedding_dim=tiny_models.FEATURES, output_dim=tiny_models.CONTEXT, ff_mult=4))
    else:
        config = AdapterConfig.sd15()
    with torch.device(device):
        adapter = FaceAdapter(config)
    for module in adapter.lora_modules():  # as after some training: a zero `up` would hide the LoRA's work
        torch.nn.init.normal_(module.up.weight, std=1e-3)
    return adapter


def inputs(model: str, batch: int = 1, frames: int | None = None, latent: int | None = None,
           device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    size = SIZES[model]
    frames, latent = frames or size["frames"], latent or size["latent"]
    g = torch.Generator().manual_seed(2)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return {"sample": make(batch, 4, frames, latent, latent), "noise": make(batch, 4, frames, latent, latent),
            "timestep": torch.randint(0, 1000, (batch,), generator=g).to(device),
            "text": make(batch * frames, 77, size["context"]),
            "features": make(batch, size["tokens"], size["features"])}


def adapter_step(unet, adapter: FaceAdapter, x: dict[str, torch.Tensor]) -> None:
    """Ours: the face branch and the unmerged LoRA in all 16 attn2 layers; gradients to the adapter."""
    prediction = adapter(unet, x["sample"], x["timestep"], x["text"], x["features"])
    F.mse_loss(prediction.float(), x["noise"].float()).backward()


def floor_step(unet, x: dict[str, torch.Tensor]) -> None:
    """The floor: the frozen UNet alone, forward + backward to its input (face branch and LoRA off)."""
    sample = x["sample"].detach().requires_grad_(True)
    prediction = unet(sample, x["timestep"], encoder_hidden_states=x["text"]).sample
    F.mse_loss(prediction.float(), x["noise"].float()).backward()


def variants(unet, adapter: FaceAdapter, x: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    def ours() -> None:
        adapter.install(unet)
        adapter.zero_grad(set_to_none=True)
        adapter_step(unet, adapter, x)

    def floor() -> None:
        FaceAdapter.uninstall(unet)
        floor_step(unet, x)

    return {"ours": ours, "floor": floor}


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create inside the mode and that are still alive, and
    their peak. Storages are told apart by their C++ object, so views count once; a storage's
    bytes are given back when it dies (weakref). Works alike on real tensors and on `meta`."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._alive: dict[int, weakref.ref] = {}
        # Views of tensors made before (weights: linear layers see `weight.t()`) are not new memory.
        self._existing = {t.untyped_storage()._cdata for t in existing}

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self._alive or key in self._existing:
            return

        def freed(_ref, key=key, size=size) -> None:
            self._alive.pop(key, None)
            self.live -= size

        self._alive[key] = weakref.ref(storage, freed)
        self.live += size
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value)
        return out


def counted_peak(step: Callable[[], None], *owners: torch.nn.Module | dict[str, torch.Tensor]) -> int:
    """The peak of new tensor memory during `step`; the owners' tensors (weights, buffers, inputs)
    exist before it and are not counted."""
    existing = [t for owner in owners for t in
                (owner.values() if isinstance(owner, dict) else [*owner.parameters(), *owner.buffers()])]
    with LiveBytes(existing) as counter:
        step()
    return counter.peak


@contextlib.contextmanager
def fused_attention_on_meta():
    """SDPA as the fused GPU kernels run it (no L x L matrix kept): on `meta` PyTorch would take
    its math path and count 8.6 GB per 64x64 self-attention. The CPU flash kernel's meta
    implementation has the fused kernels' memory: the output and a log-sum-exp per query."""
    original = F.scaled_dot_product_attention

    def fused(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or kwargs:
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, dropout_p, is_causal, scale=scale)[0]

    F.scaled_dot_product_attention = fused
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def fixed_bytes(unet, adapter: FaceAdapter, frozen_bytes_per_param: int = 2) -> dict[str, int]:
    """Weights that live through the whole run: the frozen UNet (+ the text and image encoders,
    SD1.5's CLIP-L text 123 M and ViT-H 632 M, frozen too) and the adapter's fp32 master weights,
    gradients and AdamW's two states (16 bytes per trainable parameter)."""
    frozen = sum(p.numel() for p in unet.parameters())
    trainable = sum(p.numel() for p in adapter.trainable_parameters())
    encoders = 123_060_480 + 632_076_800
    return {"frozen_unet": frozen * frozen_bytes_per_param, "frozen_encoders": encoders * frozen_bytes_per_param,
            "adapter_training_state": trainable * 16, "frozen_unet_parameters": frozen,
            "trainable_parameters": trainable}


# ---------------------------------------------------------------------------------------------


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory(model: str, checkpointing: bool) -> dict[str, Any]:
    """In this (fresh) process: the peak RSS growth of the first adapter step (blocks of 64 KiB
    and more are mmapped, so what is freed leaves RSS), and the counted peak of the next one."""
    torch.set_num_threads(1)
    unet = build_unet(model)
    adapter = build_adapter(model, unet)
    if checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers checkpoints whenever gradients are on
    adapter.install(unet)
    x = inputs(model)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    adapter_step(unet, adapter, x)
    measured = (status_kib("VmHWM") - before) * 1024
    adapter.zero_grad(set_to_none=True)
    counted = counted_peak(lambda: adapter_step(unet, adapter, x), unet, adapter, x)
    return {"measured_peak_growth": measured, "counted_peak": counted}


def estimate_full_size(checkpointing: bool, batch: int = 2, frames: int = 16, latent: int = 64) -> dict[str, Any]:
    """The counted peak of one SD1.5 + v2 step at 16 x 512 x 512, batch 2, bf16, on the meta device."""
    unet = build_unet("sd15", device="meta").to(dtype=torch.bfloat16)
    adapter = build_adapter("sd15", unet, device="meta").to(dtype=torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    adapter.install(unet)
    x = inputs("sd15", batch=batch, frames=frames, latent=latent, device="meta", dtype=torch.bfloat16)
    with fused_attention_on_meta():
        peak = counted_peak(lambda: adapter_step(unet, adapter, x), unet, adapter, x)
    fixed = fixed_bytes(unet, adapter)
    total = peak + fixed["frozen_unet"] + fixed["frozen_encoders"] + fixed["adapter_training_state"]
    return {"activations_peak": peak, **fixed, "total": total}


def time_and_count(model: str, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    unet = build_unet(model)
    adapter = build_adapter(model, unet)
    x = inputs(model)
    steps = variants(unet, adapter, x)
    flops = {}
    for name, step in steps.items():
        with common.flop_counter() as counter:
            step()
        flops[name] = counter.get_total_flops()
    result = common.Rounds()
    names = list(steps)
    for round_index in range(rounds + 1):  # round 0 is the warm-up
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        times = {name: common.cpu_seconds(steps[name]) for name in order}
        if round_index:
            for name, seconds in times.items():
                result.times.setdefault(name, []).append(seconds)
            result.loads.append(common.load_average())
            result.orders.append(order)
    predicted = flops["ours"] / flops["floor"]
    measured = result.ratio("ours", "floor")
    return {"flops": flops, "predicted_ratio": predicted, "measured_ratio": measured,
            "measured_over_predicted": measured["median"] / predicted, **result.as_json(),
            "shape": {**SIZES[model], "batch": 1}, "trainable_parameters":
            sum(p.numel() for p in adapter.trainable_parameters())}


def main() -> None:
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice, repeated for every meta model
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", choices=sorted(SIZES), default=["tiny", "sd15"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)  # subprocess: model, checkpointing
    parser.add_argument("--out", type=Path, default=common.RESULTS / "train_step.json")
    args = parser.parse_args()
    if not args._memory:  # timing keeps freed memory (common.py); the memory runs give it back
        common.keep_freed_memory()
    if args._memory:
        print(json.dumps(measure_memory(args._memory[0], args._memory[1] == "1")))
        return
    report: dict[str, Any] = {"command": "python bench/train_step.py " + " ".join(sys.argv[1:]), "machine": common.machine(), "models": {}}
    for model in args.model:
        entry: dict[str, Any] = {}
        if not args.memory_only:
            entry["time"] = time_and_count(model, args.rounds)
            t = entry["time"]
            print(f"{model}: FLOPs ours {t['flops']['ours'] / 1e9:.2f} G, floor {t['flops']['floor'] / 1e9:.2f} G "
                  f"-> predicted {t['predicted_ratio']:.4f}x; measured {t['measured_ratio']['median']:.4f}x "
                  f"({t['measured_ratio']['min']:.3f}-{t['measured_ratio']['max']:.3f}); measured/predicted "
                  f"{t['measured_over_predicted']:.4f}; ours {t['stats']['ours']['median']:.3f} s, floor "
                  f"{t['stats']['floor']['median']:.3f} s; load {min(t['load_average_1min'])}-{max(t['load_average_1min'])}",
                  flush=True)
        entry["memory"] = {}
        for checkpointing in (False, True):
            env = {k: v for k, v in os.environ.items() if k not in common.KEEP_FREED_MEMORY}
            out = subprocess.run([sys.executable, __file__, "--_memory", model, str(int(checkpointing))],
                                 check=True, capture_output=True, text=True,
                                 env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
            entry["memory"]["checkpointing" if checkpointing else "plain"] = m = json.loads(out.splitlines()[-1])
            print(f"{model} memory, checkpointing {'on' if checkpointing else 'off'}: measured peak growth "
                  f"{m['measured_peak_growth'] / 2**20:.0f} MiB, counted {m['counted_peak'] / 2**20:.0f} MiB", flush=True)
        report["models"][model] = entry
    report["full_size_estimate"] = {}
    for checkpointing in (False, True):
        e = estimate_full_size(checkpointing)
        report["full_size_estimate"]["checkpointing" if checkpointing else "plain"] = e
        print(f"full size 16x512x512 batch 2 bf16, checkpointing {'on' if checkpointing else 'off'}: activations "
              f"{e['activations_peak'] / 2**30:.1f} GiB + frozen {(e['frozen_unet'] + e['frozen_encoders']) / 2**30:.1f} GiB "
              f"+ adapter state {e['adapter_training_state'] / 2**30:.2f} GiB = {e['total'] / 2**30:.1f} GiB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
