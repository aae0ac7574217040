"""Whole step: one sampling step of the full-size SD1.5 UNet in real ComfyUI, with and without
ApplyFaceAdapter (8 frames, cfg 2, so the UNet sees a batch of 2 x 8).

Each round runs `nodes.common_ksampler` (what KSampler runs) for 2 euler steps on each model,
the order rotated, and keeps two times:
- unet: the model call(s) of the second step, timed inside ComfyUI's model_function_wrapper:
  the per-step cost in a sampling run. The first step is not kept: switching models makes
  ComfyUI patch (or restore) the merged LoRA weights, after which the next UNet call takes
  more page faults (measured at 32x32: 0.4-1.7 million, 0.7-4.5 s of system time, for the
  adapter's first step against 0.3-0.4 million, 0.5-0.7 s, for plain's), which a user sampling
  many steps pays once per run, not per step;
- sampler: the whole common_ksampler call, per-run work included (patching, both steps).
The FLOP floor is counted with torch.utils.flop_counter on the warm-up run's second step.

    python bench/step.py                     # 32x32 and 64x64 latents, 11 rounds
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import torch


class TimedModel:
    """A clone of `model` whose UNet calls are timed (and FLOP-counted during the warm-up run).

    ComfyUI batches cond and uncond into one UNet call when it thinks memory allows, else it
    makes one call per chunk (on CPU it asks how much RAM is free, which changes with whatever
    else runs on the machine); the calls of the kept step are summed, and their batch sizes kept.
    """

    STEPS = 2  # sampled per run; only the last one is kept

    def __init__(self, model, device: str) -> None:
        self.unet_seconds: list[float] = []
        self.batches: list[list[int]] = []
        self.flops: int | None = None
        self.device = device
        self.model = model.clone()
        self.model.set_model_unet_function_wrapper(self.wrapper)
        self._calls: list[tuple[float, int, float]] = []  # (timestep, batch, seconds or FLOPs)
        self._counting = False

    def wrapper(self, apply_model, args):
        def call():
            return apply_model(args["input"], args["timestep"], **args["c"])

        if self._counting:  # the warm-up run: count, do not time
            with common.flop_counter() as counter:
                out = call()
            amount = counter.get_total_flops()
        else:
            out, amount = common.timed(call, self.device)
        self._calls.append((float(args["timestep"].flatten()[0]), int(args["input"].shape[0]), amount))
        return out

    def run(self, session: common.Session, frames: int, size: int) -> None:
        """One sampling run; the first run counts FLOPs instead of timing."""
        self._calls = []
        self._counting = self.flops is None
        common.sample(session, self.model, frames=frames, size=size * 8, steps=self.STEPS, cfg=2.0)
        last_step = [c for c in self._calls if c[0] == self._calls[-1][0]]
        if self._counting:
            self.flops, self._counting = sum(c[2] for c in last_step), False
        else:
            self.unet_seconds.append(sum(c[2] for c in last_step))
            self.batches.append([c[1] for c in last_step])


def measure(session: common.Session, unet, ida, embeds, frames: int, size: int, rounds: int, device: str) -> dict:
    models = {"plain": TimedModel(unet, device),
              "ours": TimedModel(common.apply_adapter(session, unet, ida, embeds, weight=0.8), device)}
    print(f"\n{frames} frames x cond/uncond, {size}x{size} latent: {rounds} rounds of {TimedModel.STEPS} steps "
          f"per model (the last one timed)")
    with torch.inference_mode():
        result = common.alternate(
            {name: (lambda m=m: m.run(session, frames, size)) for name, m in models.items()}, rounds, device=device)
    unet_rounds = common.Rounds(times={name: m.unet_seconds for name, m in models.items()}, loads=result.loads,
                                orders=result.orders)
    return {
        "frames": frames, "latent": size, "cfg": 2.0, "steps": TimedModel.STEPS, "timed_step": "last",
        "unet": unet_rounds.as_json(), "sampler": result.as_json(),
        "unet_ratio": unet_rounds.ratio("ours", "plain"), "sampler_ratio": result.ratio("ours", "plain"),
        "flops": {name: m.flops for name, m in models.items()},
        "unet_call_batches": {name: m.batches for name, m in models.items()},
        "flop_floor": models["ours"].flops / models["plain"].flops,
        "contended": common.contended(result.loads),
    }


def main() -> None:
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
    name = f"step-{'-'.join(f'{n}x{n}' for n in args.latents)}-{args.frames}f"
    common.write_json(name, {"machine": common.machine(args.device), "results": results}, args.out, args.device)


if __name__ == "__main__":
    main()
