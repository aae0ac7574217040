"""Whole step: one sampling step of the full-size SD1.5 UNet in real ComfyUI, with and without
ApplyFaceAdapter (8 frames, cfg 2, so the UNet sees a batch of 2 x 8).

Each round runs `nodes.common_ksampler` (what KSampler runs) for 2 euler steps on each model,
the order rotated, and keeps four measurements:
- unet: the model call(s) of the second step, timed inside ComfyUI's model_function_wrapper:
  the per-step cost in a sampling run. The first step is not kept: switching models makes
  ComfyUI patch (or restore) the merged LoRA weights, after which the next UNet call takes
  more page faults (measured at 32x32 with the default allocator: 0.4-1.7 million, 0.7-4.5 s
  of system time, for the adapter's first step against 0.3-0.4 million, 0.5-0.7 s, for
  plain's), which a user sampling many steps pays once per run, not per step. User time, system time and minor page faults of
  the kept step are recorded beside its CPU time;
- paired: in the adapter's run, each UNet call of the second step is made twice, with the face
  branch and without it (the attn2 patches left out of that call's transformer_options; same
  merged weights, same input), back to back in alternating order. The two models' steps are a
  minute and a weight patch apart; these two calls differ only by the face branch and are
  seconds apart;
- attn2 pairs: in the adapter's first (untimed) step, every attn2 call runs our patch and
  ComfyUI's plain attention (what the layer runs without the patch) on the same q, k, v, back
  to back, order alternating. Their summed difference is the face branch's cost within a real
  step, measured milliseconds apart instead of seconds, and the estimate of the whole step is
  (face-off step + that difference) / face-off step. Outside attn2 the two models run the
  same kernels on same-shaped tensors (the LoRA is merged into same-shaped weights);
- sampler: the whole common_ksampler call, per-run work included (patching, both steps), less
  the adapter run's extra work above (the face-off call(s) and the plain attn2 calls).
The FLOP floor is counted with torch.utils.flop_counter on the warm-up run's second step. The
script restarts itself with the allocator keeping freed memory (common.keep_freed_memory).

    python bench/step.py                     # 32x32 and 64x64 latents, 11 rounds
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import dataclasses
import functools
import statistics

import torch


def without_face_branch(c: dict) -> dict:
    """A UNet call's keyword arguments with the attn2 replace patches (the face branch) left out."""
    options = c["transformer_options"]
    replace = options.get("patches_replace", {})
    if "attn2" not in replace:
        raise RuntimeError("this UNet call carries no attn2 patches: nothing to pair against")
    others = {kind: patches for kind, patches in replace.items() if kind != "attn2"}
    return {**c, "transformer_options": {**options, "patches_replace": others}}


class Attn2Pairs:
    """Runs each attn2 patch of a UNet call beside ComfyUI's plain attention and times both."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.seconds = {"patch": 0.0, "plain": 0.0}
        self.calls = 0

    def wrap(self, c: dict) -> dict:
        """The UNet call's keyword arguments with every attn2 patch wrapped by `paired_call`."""
        options = c["transformer_options"]
        replace = options["patches_replace"]
        attn2 = {key: functools.partial(self.paired_call, patch) for key, patch in replace["attn2"].items()}
        return {**c, "transformer_options": {**options, "patches_replace": {**replace, "attn2": attn2}}}

    def paired_call(self, patch, q, k, v, extra_options: dict):
        from comfy.ldm.modules.attention import optimized_attention

        variants = {
            "patch": lambda: patch(q, k, v, extra_options),
            # what CrossAttention.forward runs between its projections when no patch replaces it
            "plain": lambda: optimized_attention(q, k, v, extra_options["n_heads"],
                                                 attn_precision=extra_options.get("attn_precision")),
        }
        order = list(variants) if self.calls % 2 else list(variants)[::-1]
        self.calls += 1
        results = {}
        for name in order:
            results[name], seconds = common.timed(variants[name], self.device)
            self.seconds[name] += seconds
        return results["patch"]


class TimedModel:
    """A clone of `model` whose UNet calls are timed (and FLOP-counted during the warm-up run).

    ComfyUI batches cond and uncond into one UNet call when it thinks memory allows, else it
    makes one call per chunk (on CPU it asks how much RAM is free, which changes with whatever
    else runs on the machine); the calls of the kept step are summed, and their batch sizes kept.
    With `paired`, the kept step's calls are also timed without the face branch, and the first
    step's attn2 calls beside plain attention (see the module).
    """

    STEPS = 2  # sampled per run; only the last one is kept

    def __init__(self, model, device: str, paired: bool = False) -> None:
        self.unet_seconds: list[float] = []
        self.usage: list[common.Usage] = []  # CPU only: user/system time and page faults of the kept step
        self.batches: list[list[int]] = []
        self.paired_seconds: dict[str, list[float]] | None = {"face on": [], "face off": []} if paired else None
        self.paired_usage: dict[str, list[common.Usage]] = {"face on": [], "face off": []}
        self.paired_orders: list[list[str]] = []
        self.attn2_pairs: dict[str, list[float]] = {"patch": [], "plain": []}
        self.attn2_pair_calls: list[int] = []
        self.flops: int | None = None
        self.device = device
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self.wrapper)
        self._calls: list[tuple[int, int, float, common.Usage]] = []  # (step, batch, seconds or FLOPs, usage)
        self._paired_calls: dict[str, list[tuple[float, common.Usage]]] = {}
        self._timesteps: list[float] = []
        self._attn2 = Attn2Pairs(device)
        self._paired_order: list[str] = []
        self._runs = 0
        self._counting = False

    def timed(self, fn) -> tuple[object, float, common.Usage]:
        """fn()'s result, its time (CPU or, on CUDA, synchronised wall) and its usage."""
        (out, seconds), usage = common.used(lambda: common.timed(fn, self.device))
        return out, seconds, usage

    def wrapper(self, apply_model, args):
        def call(c=args["c"]):
            return apply_model(args["input"], args["timestep"], **c)

        timestep = float(args["timestep"].flatten()[0])
        if timestep not in self._timesteps:
            self._timesteps.append(timestep)
        step = self._timesteps.index(timestep)
        if self._counting:  # the warm-up run: count, do not time
            with common.flop_counter() as counter:
                out = call()
            self._calls.append((step, int(args["input"].shape[0]), counter.get_total_flops(), common.Usage(0, 0, 0)))
            return out
        if self.paired_seconds is None or step != self.STEPS - 1:
            c = self._attn2.wrap(args["c"]) if self.paired_seconds is not None and step == 0 else args["c"]
            out, seconds, usage = self.timed(lambda: call(c))
            self._calls.append((step, int(args["input"].shape[0]), seconds, usage))
            return out
        variants = {"face on": call, "face off": lambda: call(without_face_branch(args["c"]))}
        order = list(variants) if self._runs % 2 else list(variants)[::-1]
        self._paired_order = order
        results = {}
        for name in order:
            results[name], seconds, usage = self.timed(variants[name])
            self._paired_calls.setdefault(name, []).append((seconds, usage))
        self._calls.append((step, int(args["input"].shape[0]), *self._paired_calls["face on"][-1]))
        return results["face on"]

    def run(self, session: common.Session, frames: int, size: int) -> None:
        """One sampling run; the first run counts FLOPs instead of timing."""
        self._calls, self._paired_calls, self._timesteps = [], {}, []
        self._attn2 = Attn2Pairs(self.device)
        self._counting = self.flops is None
        common.sample(session, self.model, frames=frames, size=size * 8, steps=self.STEPS, cfg=2.0)
        last_step = [c for c in self._calls if c[0] == self.STEPS - 1]
        if self._counting:
            self.flops, self._counting = sum(c[2] for c in last_step), False
            return
        self._runs += 1
        self.unet_seconds.append(sum(c[2] for c in last_step))
        self.usage.append(sum((c[3] for c in last_step), common.Usage(0, 0, 0)))
        self.batches.append([c[1] for c in last_step])
        if self.paired_seconds is not None:
            self.paired_orders.append(self._paired_order)
            self.attn2_pair_calls.append(self._attn2.calls)
            for name, seconds in self._attn2.seconds.items():
                self.attn2_pairs[name].append(seconds)
            for name, calls in self._paired_calls.items():
                self.paired_seconds[name].append(sum(seconds for seconds, _ in calls))
                self.paired_usage[name].append(sum((usage for _, usage in calls), common.Usage(0, 0, 0)))


def without_extra_calls(sampler: common.Rounds, extra_seconds: list[float]) -> common.Rounds:
    """The KSampler rounds with the adapter run's extra work (face-off calls, plain attn2 calls)
    taken out of its time: it is the benchmark's, not part of what a user's run costs."""
    times = {**sampler.times, "ours": [t - extra for t, extra in zip(sampler.times["ours"], extra_seconds)]}
    return common.Rounds(times=times, loads=sampler.loads, orders=sampler.orders)


def attn2_estimate(ours: TimedModel) -> dict:
    """Per round: 1 + (patch - plain attn2 time of one step) / the face-off step's UNet time."""
    estimates = [1 + (patch - plain) / off for patch, plain, off in
                 zip(ours.attn2_pairs["patch"], ours.attn2_pairs["plain"], ours.paired_seconds["face off"])]
    return {"median": statistics.median(estimates), "min": min(estimates), "max": max(estimates),
            "per_round": estimates}


def usage_json(usages: list[common.Usage]) -> dict[str, list]:
    return {field.name: [getattr(u, field.name) for u in usages] for field in dataclasses.fields(common.Usage)}


def measure(session: common.Session, unet, ida, embeds, frames: int, size: int, rounds: int, device: str) -> dict:
    models = {"plain": TimedModel(unet, device),
              "ours": TimedModel(common.apply_adapter(session, unet, ida, embeds, weight=0.8), device, paired=True)}
    print(f"\n{frames} frames x cond/uncond, {size}x{size} latent: {rounds} rounds of {TimedModel.STEPS} steps "
          f"per model (the last one timed)")
    with torch.inference_mode():
        result = common.alternate(
            {name: (lambda m=m: m.run(session, frames, size)) for name, m in models.items()}, rounds, device=device)
    unet_rounds = common.Rounds(times={name: m.unet_seconds for name, m in models.items()}, loads=result.loads,
                                orders=result.orders)
    ours = models["ours"]
    paired = common.Rounds(times=ours.paired_seconds, loads=result.loads, orders=ours.paired_orders)
    result = without_extra_calls(result, [off + plain for off, plain in
                                          zip(ours.paired_seconds["face off"], ours.attn2_pairs["plain"])])
    return {
        "frames": frames, "latent": size, "cfg": 2.0, "steps": TimedModel.STEPS, "timed_step": "last",
        "unet": unet_rounds.as_json(), "sampler": result.as_json(),
        "unet_ratio": unet_rounds.ratio("ours", "plain"), "sampler_ratio": result.ratio("ours", "plain"),
        "unet_usage": {name: usage_json(m.usage) for name, m in models.items()},
        "paired": {**paired.as_json(), "ratio": paired.ratio("face on", "face off"),
                   "usage": {name: usage_json(u) for name, u in ours.paired_usage.items()}},
        "attn2_pairs": {"seconds": ours.attn2_pairs, "calls": ours.attn2_pair_calls,
                        "step_estimate": attn2_estimate(ours)},
        "flops": {name: m.flops for name, m in models.items()},
        "unet_call_batches": {name: m.batches for name, m in models.items()},
        "flop_floor": models["ours"].flops / models["plain"].flops,
        "contended": common.contended(result.loads),
    }


def main() -> None:
    common.keep_freed_memory()
    args = common.video_arguments(__doc__.splitlines()[0]).parse_args()
    session = common.start_comfy(args.device, args.attention)
    unet, ida, embeds = common.load_identity(session)
    common.set_threads(args.threads)
    results = [measure(session, unet, ida, embeds, args.frames, size, args.rounds, args.device)
               for size in args.latents]
    rows = []
    for r in results:
        unet_stats, sampler_stats = r["unet"]["stats"], r["sampler"]["stats"]
        loads = r["sampler"]["load_average_1min"]
        for name in ("plain", "ours"):
            calls = sorted({tuple(b) for b in r["unet_call_batches"][name]})
            rows.append([f"{r['latent']}x{r['latent']}", name, " or ".join("+".join(map(str, c)) for c in calls),
                         unet_stats[name]["median"],
                         f"{unet_stats[name]['min']:.2f}-{unet_stats[name]['max']:.2f}",
                         "1" if name == "plain" else common.fmt_ratio(r["unet_ratio"]),
                         sampler_stats[name]["median"],
                         "1" if name == "plain" else common.fmt_ratio(r["sampler_ratio"]),
                         r["flops"][name] / 1e12, "1" if name == "plain" else f"{r['flop_floor']:.5f}",
                         f"{min(loads)}-{max(loads)}"])
    common.print_table(f"One sampling step ({args.frames} frames, cfg 2, {args.device}, {args.threads} thread(s), "
                       f"CPU seconds)", ["latent", "model", "unet batches", "unet s", "min-max", "unet ratio", "sampler s",
                                          "sampler ratio", "TFLOP", "FLOP floor", "load 1min"], rows)
    common.print_table("The adapter's UNet call(s) of one step with and without the face branch, back to back",
                       ["latent", "face branch", "unet s", "min-max", "ratio"],
                       [[f"{r['latent']}x{r['latent']}", name, r["paired"]["stats"][name]["median"],
                         f"{r['paired']['stats'][name]['min']:.2f}-{r['paired']['stats'][name]['max']:.2f}",
                         "1" if name == "face off" else common.fmt_ratio(r["paired"]["ratio"])]
                        for r in results for name in ("face off", "face on")])
    common.print_table("attn2 calls of the adapter's first step: patch vs plain attention on the same q, k, v",
                       ["latent", "calls", "patch s", "plain s", "step estimate"],
                       [[f"{r['latent']}x{r['latent']}", r["attn2_pairs"]["calls"][0],
                         statistics.median(r["attn2_pairs"]["seconds"]["patch"]),
                         statistics.median(r["attn2_pairs"]["seconds"]["plain"]),
                         common.fmt_ratio(r["attn2_pairs"]["step_estimate"])] for r in results])
    name = f"step-{'-'.join(f'{n}x{n}' for n in args.latents)}-{args.frames}f"
    common.write_json(name, {"machine": common.machine(args.device), "results": results}, args.out, args.device)


if __name__ == "__main__":
    main()
