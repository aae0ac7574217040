"""Attention-layer cost: the 16 attn2 layers of one sampling step, plain vs ours vs official.

The inputs are captured from one real ComfyUI sampling step of the patched model (an
`attn2_patch` that records the hidden states, the text context and ComfyUI's extra_options at
each cross-attention layer); each variant then runs all 16 layers on exactly those inputs:

- plain:    ComfyUI's own attn2 (`CrossAttention.forward`: to_q/k/v, optimized_attention, to_out);
- ours:     what BasicTransformerBlock does with our patch registered: to_q/k/v (LoRA merged, so
            the same cost as plain), the real FaceAttentionPatch, to_out;
- official: bench/official_reference.py: unmerged rank-128 LoRA on q/k/v/out at every call, face
            K/V re-projected from each frame's copy of the tokens, non-fused attention.

    python bench/attention.py                      # 8 frames, 32x32 and 64x64 latents, 7 rounds
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import torch

from official_reference import OfficialAttn2, official_attn2, official_context


def capture_layers(session: common.Session, model, frames: int, size: int) -> list[dict]:
    """Run one real step and keep each attn2 layer's inputs (hidden, context, extra_options)."""
    calls: list[dict] = []

    def record(n, context, value, extra_options):
        calls.append({"hidden": n.clone(), "context": context.clone(), "options": dict(extra_options)})
        return n, context, value

    recording = model.clone()
    recording.set_model_attn2_patch(record)
    common.sample(session, recording, frames=frames, size=size * 8, steps=1, cfg=2.0)
    # 16 calls when ComfyUI batches cond and uncond, 32 when it runs them apart (low free RAM)
    if len(calls) not in (16, 32):
        raise RuntimeError(f"expected 16 or 32 attn2 calls in one step, got {len(calls)}")
    return calls


def build_layers(session: common.Session, model, ida, embeds, calls: list[dict], weight: float) -> list[dict]:
    """For each captured call: the UNet's attn2 module, our registered patch, the official layer."""
    layer_map = session.sub("adapter.layer_map")
    face_attention = session.sub("adapter.face_attention")
    diffusion_model = model.model.diffusion_model
    patches = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    layers = []
    for call in calls:
        block = tuple(call["options"]["block"])
        layer = layer_map.layer_by_patch_key(block)
        attn2 = diffusion_model.get_submodule(f"{layer.ldm_block}.transformer_blocks.0.attn2")
        patch = patches.get(block) or patches[(*block, 0)]
        dtype = attn2.to_q.weight.dtype
        official = OfficialAttn2.from_tensors(
            {"to_q": attn2.to_q.weight, "to_k": attn2.to_k.weight, "to_v": attn2.to_v.weight,
             "to_out": attn2.to_out[0].weight, "to_out_bias": attn2.to_out[0].bias},
            ida.weights.layers[layer.official_index], heads=attn2.heads, dtype=dtype)
        chunks = call["options"]["cond_or_uncond"]
        frames = call["hidden"].shape[0] // len(chunks)
        # the official pipeline appends each row's face tokens (cond: the identity, uncond: the
        # negative tokens) to that row's 77 text tokens
        tokens = face_attention.batch_face_kv(embeds.face_tokens[:1], embeds.uncond_tokens[None], chunks, frames)
        layers.append({"call": call, "attn2": attn2, "patch": patch, "official": official,
                       "official_context": official_context(call["context"], tokens.to(dtype)), "weight": weight})
    return layers


def run_plain(layers: list[dict]) -> list[torch.Tensor]:
    return [x["attn2"](x["call"]["hidden"], context=x["call"]["context"], transformer_options=x["call"]["options"])
            for x in layers]


def run_ours(layers: list[dict]) -> list[torch.Tensor]:
    outs = []
    for x in layers:
        attn2, call = x["attn2"], x["call"]
        q, k, v = attn2.to_q(call["hidden"]), attn2.to_k(call["context"]), attn2.to_v(call["context"])
        outs.append(attn2.to_out(x["patch"](q, k, v, call["options"])))
    return outs


def run_official(layers: list[dict]) -> list[torch.Tensor]:
    return [official_attn2(x["call"]["hidden"], x["official_context"], x["official"], x["weight"]) for x in layers]


VARIANTS = {"plain": run_plain, "ours": run_ours, "official": run_official}


def flops(fn, layers: list[dict]) -> int:
    with common.flop_counter() as counter:
        fn(layers)
    return counter.get_total_flops()


def measure(session: common.Session, unet, ida, embeds, frames: int, size: int, rounds: int,
            threads: int, device: str) -> dict:
    model = common.apply_adapter(session, unet, ida, embeds, weight=0.8)
    torch.set_num_threads(max(threads, torch.get_num_threads()))  # the capture step is not timed
    calls = capture_layers(session, model, frames, size)
    layers = build_layers(session, model, ida, embeds, calls, weight=0.8)
    common.set_threads(threads)
    with torch.inference_mode():
        counted = {name: flops(fn, layers) for name, fn in VARIANTS.items()}
        print(f"\n{frames} frames x 2 chunks, {size}x{size} latent: {rounds} rounds of all 16 layers")
        result = common.alternate({name: (lambda fn=fn: fn(layers)) for name, fn in VARIANTS.items()},
                                  rounds, device=device)
    return {
        "frames": frames, "latent": size, "attn2_calls": len(calls),
        "batches": sorted({call["hidden"].shape[0] for call in calls}),
        "dtype": str(layers[0]["attn2"].to_q.weight.dtype),
        "flops": counted, "rounds": result.as_json(),
        "ratio_vs_plain": {name: result.ratio(name, "plain") for name in VARIANTS if name != "plain"},
        "flop_ratio_vs_plain": {name: counted[name] / counted["plain"] for name in VARIANTS if name != "plain"},
        "contended": common.contended(result.loads),
    }


def main() -> None:
    common.keep_freed_memory()
    args = common.video_arguments(__doc__.splitlines()[0]).parse_args()
    session = common.start_comfy(args.device, args.attention)
    unet, ida, embeds = common.load_identity(session)
    results = [measure(session, unet, ida, embeds, args.frames, size, args.rounds, args.threads, args.device)
               for size in args.latents]
    rows = []
    for r in results:
        stats = r["rounds"]["stats"]
        for name in VARIANTS:
            ratio = "1" if name == "plain" else common.fmt_ratio(r["ratio_vs_plain"][name])
            flop_ratio = 1.0 if name == "plain" else r["flop_ratio_vs_plain"][name]
            rows.append([f"{r['latent']}x{r['latent']}", name, stats[name]["median"] * 1e3,
                         f"{stats[name]['min'] * 1e3:.1f}-{stats[name]['max'] * 1e3:.1f}", ratio,
                         r["flops"][name] / 1e9, f"{flop_ratio:.4f}",
                         f"{min(r['rounds']['load_average_1min'])}-{max(r['rounds']['load_average_1min'])}"])
    common.print_table(f"16 attn2 layers of one step ({args.frames} frames x cond/uncond, {args.device}, "
                       f"{args.threads} thread(s), CPU ms per step)",
                       ["latent", "variant", "median ms", "min-max ms", "time ratio (min-max)", "GFLOP",
                        "FLOP ratio", "load 1min"], rows)
    common.write_json("attention", {"machine": common.machine(args.device), "results": results}, args.out,
                      args.device)


if __name__ == "__main__":
    main()
