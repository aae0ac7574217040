"""Shared benchmark plumbing: the test bed's ComfyUI and models, CPU-time rounds, tables, JSON.

Timing method (issue 7; these machines are shared and noisy): one torch thread, process CPU time
(`time.process_time`, which other processes on the machine do not advance), every variant timed
in the same process with the order rotated each round, one warm-up round, then the median of
>= 7 rounds with min-max. The 1-minute load average is recorded with every round, so a reader
can see how contended the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

# The test bed (tests/support) is reused, not copied; importing tests/conftest also exposes the
# pure core as `id_animator.adapter` and reads the bootstrap's paths (IDA_* or bootstrap --print).
# Loaded by path under its own name: inside pytest, `conftest` in sys.modules may be another
# folder's conftest (tests/install/, tests/integration/), which has no PATHS.
sys.path.insert(0, str(REPO / "tests"))


def _test_bed_conftest():
    import importlib.util

    name = "ida_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests" / "conftest.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


PATHS = _test_bed_conftest().PATHS


# --attention: the ComfyUI flag each choice passes. On CPU ComfyUI's default is the sub-quadratic
# kernel, which picks its query chunk (256..4096) from the free RAM at each call, so its cost
# moves with whatever else the machine holds; PyTorch's SDPA does not.
ATTENTION = {"pytorch": ["--use-pytorch-cross-attention"], "comfy-cpu-default": []}


def base_arguments(description: str) -> argparse.ArgumentParser:
    """Options every benchmark takes: --device, --rounds, --threads, --out, --attention."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: fp32, process CPU time; cuda: fp16, wall time with synchronize")
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds after one warm-up (>= 7)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads while timing (1 = the reproducible method)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default bench/results/<name>.json)")
    parser.add_argument("--attention", choices=ATTENTION, default="pytorch",
                        help="ComfyUI's attention backend: pytorch (its default with a GPU) or comfy-cpu-default "
                             "(sub-quadratic, whose chunk size and so cost follow the free RAM)")
    return parser


def video_arguments(description: str) -> argparse.ArgumentParser:
    """base_arguments plus the video being sampled: --frames and --latents."""
    parser = base_arguments(description)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--latents", type=int, nargs="+", default=[32, 64], help="latent sizes (pixels / 8)")
    return parser


# ---------------------------------------------------------------------------------------------
# The real ComfyUI of the test bed


@dataclass
class Session:
    """ComfyUI 0.30.0 in this process with the pack loaded from this checkout and the test bed's models."""

    comfy: Any  # support.harness.InProcessComfy
    base: Path
    pack: Any  # the pack module as ComfyUI imported it

    def sub(self, module: str) -> Any:
        import importlib

        return importlib.import_module(f"{self.pack.__name__}.{module}")

    @property
    def nodes(self) -> dict[str, Any]:
        return self.comfy.nodes.NODE_CLASS_MAPPINGS


def start_comfy(device: str = "cpu", attention: str = "pytorch") -> Session:
    """Generate (or reuse) the cached full-size random models and start ComfyUI in-process
    with the `attention` backend (a key of ATTENTION)."""
    from support import models, photos
    from support.harness import InProcessComfy, make_base

    files = models.ensure_models(PATHS["cache"], PATHS["comfyui"], PATHS["scrfd"])
    base = make_base(Path(tempfile.mkdtemp(prefix="ida-bench-")), REPO, files)
    photos.write_inputs(base / "input", PATHS["scrfd"])
    _parse_comfy_args(base, ["--cpu"] * (device == "cpu") + ATTENTION[attention]
                      + ["--base-directory", str(base), "--disable-api-nodes"])
    comfy = InProcessComfy(PATHS["comfyui"], base)
    name = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"].__module__.rsplit(".nodes.", 1)[0]
    return Session(comfy, base, sys.modules[name])


def _parse_comfy_args(base: Path, argv: list[str]) -> None:
    """Parse ComfyUI's arguments before the harness does (it always passes --cpu and nothing
    else): `comfy.cli_args` parses once at import, so importing it first with our argv wins."""
    if str(PATHS["comfyui"]) not in sys.path:
        sys.path.insert(0, str(PATHS["comfyui"]))
    import comfy.options

    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, ["main.py", *argv, "--output-directory", str(base / "output")]
    try:
        import comfy.cli_args  # noqa: F401
    finally:
        sys.argv = saved


def load_identity(session: Session, photo: str = "astronaut.png"):
    """The real loaders: SD1.5 UNet (random weights), the adapter bundle, one identity from a photo."""
    import torch
    from support.graphs import ADAPTER, CLIP_VISION, DETECTOR, UNET
    from support.photos import astronaut_image

    unet = session.comfy.nodes.UNETLoader().load_unet(UNET, "default")[0]
    ida = session.nodes["LoadIDAnimator"].execute(ADAPTER, CLIP_VISION, DETECTOR, "CPU").args[0]
    image = torch.from_numpy(astronaut_image()).float()[None] / 255.0
    embeds = session.nodes["FaceEncode"].execute(ida, image, "most confident", 0, "error").args[0]
    return unet, ida, embeds


def apply_adapter(session: Session, model, ida, embeds, weight: float = 0.8, lora_strength: float = 1.0):
    """ApplyFaceAdapter.execute, as the node runs in a graph."""
    node = session.nodes["ApplyFaceAdapter"]
    return node.execute(model, ida, embeds, weight, 0.0, 1.0, lora_strength, None).args[0]


def text_conditioning(seed: int, device: str = "cpu"):
    import torch

    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 768, generator=gen), {}]]


def sample(session: Session, model, frames: int, size: int, steps: int = 1, cfg: float = 2.0):
    """nodes.common_ksampler (what KSampler runs) on a zero latent of `frames` x size x size pixels/8."""
    import torch

    latent = {"samples": torch.zeros(frames, 4, size // 8, size // 8)}
    return session.comfy.nodes.common_ksampler(model, 0, steps, cfg, "euler", "normal", text_conditioning(1),
                                               text_conditioning(2), latent)[0]["samples"]


def record_unet_inputs(model) -> tuple[Any, list[tuple[int, ...]]]:
    """A clone of the MODEL that records the input shape of every UNet call it makes."""
    shapes: list[tuple[int, ...]] = []

    def record(apply_model, args):
        shapes.append(tuple(args["input"].shape))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model = model.clone()
    model.set_model_unet_function_wrapper(record)
    return model, shapes


def flop_counter():
    """torch's FlopCounterMode, also counting the fused CPU attention kernel.

    torch 2.14 has formulas for the CUDA SDPA kernels only; without this, PyTorch SDPA on CPU
    (our face branch) would count as zero FLOPs."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_flash(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash})


# ---------------------------------------------------------------------------------------------
# Timing


def load_average() -> float:
    """The 1-minute load average (2 cores here: above ~2 the machine is contended)."""
    return round(os.getloadavg()[0], 2)


@dataclass
class Rounds:
    """CPU seconds per round for each variant, and the load average seen at each round."""

    times: dict[str, list[float]] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    orders: list[list[str]] = field(default_factory=list)

    def stats(self, name: str) -> dict[str, float]:
        values = self.times[name]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}

    def ratio(self, name: str, baseline: str) -> dict[str, float]:
        """Median of the per-round ratios (each round pairs variants run moments apart), with min-max."""
        ratios = [a / b for a, b in zip(self.times[name], self.times[baseline])]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}

    def as_json(self) -> dict[str, Any]:
        return {"seconds": self.times, "load_average_1min": self.loads, "orders": self.orders,
                "stats": {name: self.stats(name) for name in self.times}}


def timed(fn: Callable[[], Any], device: str = "cpu") -> tuple[Any, float]:
    """fn()'s result and its process CPU time on CPU; wall time with device synchronisation on CUDA."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        torch.cuda.synchronize()
        return result, time.perf_counter() - start
    start = time.process_time()
    result = fn()
    return result, time.process_time() - start


@dataclass(frozen=True)
class Usage:
    """CPU time split into user and system, and minor page faults, of this process (getrusage)."""

    user: float
    system: float
    minor_faults: int

    @classmethod
    def now(cls) -> "Usage":
        r = resource.getrusage(resource.RUSAGE_SELF)
        return cls(r.ru_utime, r.ru_stime, r.ru_minflt)

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.user + other.user, self.system + other.system, self.minor_faults + other.minor_faults)

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(self.user - other.user, self.system - other.system, self.minor_faults - other.minor_faults)


def used(fn: Callable[[], Any]) -> tuple[Any, Usage]:
    """fn()'s result and the user time, system time and minor page faults it took."""
    start = Usage.now()
    result = fn()
    return result, Usage.now() - start


# glibc gives large freed blocks back to the OS and maps fresh pages on the next UNet call, and
# how many depends on the allocator's history, not on the variant: 0.5-1.8 million minor faults
# (0.8-3.4 s of system time) per 32x32, 8-frame step, alike for the same call made twice. Timing
# benchmarks run with freed memory kept by the allocator, so CPU time is the work's.
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**34),
                     "MALLOC_TOP_PAD_": "0"}


def keep_freed_memory() -> None:
    """Restart this script with KEEP_FREED_MEMORY in the environment unless it is already there
    (glibc reads it at start-up only). Call first thing in a timing benchmark's main()."""
    if all(os.environ.get(name) == value for name, value in KEEP_FREED_MEMORY.items()):
        return
    os.environ.update(KEEP_FREED_MEMORY)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, *sys.argv])


def cpu_seconds(fn: Callable[[], Any], device: str = "cpu") -> float:
    return timed(fn, device)[1]


def alternate(variants: dict[str, Callable[[], Any]], rounds: int, device: str = "cpu",
              warmup: int = 1, progress: bool = True) -> Rounds:
    """Run every variant once per round, the order rotated by one each round; warm-up rounds dropped."""
    names = list(variants)
    result = Rounds(times={name: [] for name in names})
    for r in range(warmup + rounds):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        spent = {name: cpu_seconds(variants[name], device) for name in order}
        if r < warmup:
            continue
        for name in names:
            result.times[name].append(spent[name])
        result.loads.append(load_average())
        result.orders.append(order)
        if progress:
            line = "  ".join(f"{n} {spent[n]:.4f}s" for n in names)
            print(f"  round {r - warmup + 1}/{rounds}: {line}  (load {result.loads[-1]})", flush=True)
    return result


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Reporting


def machine(device: str = "cpu") -> dict[str, Any]:
    """What ran the benchmark: CPU, cores, memory, torch, ComfyUI, load average now."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "comfyui": str(PATHS["comfyui"]), "device": device,
            "malloc": {name: os.environ.get(name) for name in KEEP_FREED_MEMORY},
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if comfy_attention():
        info["comfy_attention"] = comfy_attention()
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def comfy_attention() -> str | None:
    """The attention function ComfyUI picked (at import) in this process; None before ComfyUI runs."""
    module = sys.modules.get("comfy.ldm.modules.attention")
    return module.optimized_attention.__name__ if module else None


def contended(loads: Sequence[float], cores: int | None = None) -> bool:
    """True when the load average exceeded the core count during the run."""
    return bool(loads) and max(loads) > (cores or os.cpu_count() or 1)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    def text(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[text(c) for c in header]] + [[text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def write_json(name: str, payload: dict[str, Any], out: Path | None = None, device: str = "cpu") -> Path:
    """bench/results/<name>[-cuda].json (or `out`), with the command line that produced it."""
    path = out or RESULTS / (f"{name}-cuda.json" if device == "cuda" else f"{name}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]), **payload}
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
    return path


def fmt_ratio(r: dict[str, float]) -> str:
    return f"{r['median']:.3f}x ({r['min']:.3f}-{r['max']:.3f})"
