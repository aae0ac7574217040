"""Load and encode: adapter load (.ckpt vs converted .safetensors), FaceEncode per image, and what
a second run of the same graph re-executes.

1. load_adapter_checkpoint on the test bed's animator.ckpt (official `state_dict` container,
   torch.load weights_only) and on the same weights converted to .safetensors, alternated.
   Both files stay in the page cache after the warm-up round, so this is parsing and
   validation cost, not disk speed.
2. FaceEncode (the node's execute) on one photo and on a batch of 4, beside its parts: face
   detection + alignment, the CLIP ViT-H/14 forward, the Resampler, and the unconditional
   tokens (a second CLIP + Resampler pass on a zero image; since issue 19 done once per loaded
   adapter, so FaceEncode_1/_4 here reuse the tokens the first call computed).
3. The smallest identity graph (tests/support/graphs.face_video_graph) queued three times:
   as is, unchanged, and with a new seed; ComfyUI's messages say which nodes ran.

    python bench/load_encode.py
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import tempfile
import time
from pathlib import Path

import torch


def adapter_load(session: common.Session, rounds: int) -> dict:
    from support.graphs import ADAPTER

    checkpoint = session.sub("adapter.checkpoint")
    folders = session.sub("nodes.folders")
    ckpt = Path(session.comfy.folder_paths.get_full_path_or_raise(folders.ADAPTER_FOLDER, ADAPTER))
    converted = Path(tempfile.mkdtemp(prefix="ida-bench-")) / "animator.safetensors"
    checkpoint.save_adapter_safetensors(checkpoint.load_adapter_checkpoint(ckpt), converted)
    print(f"\nadapter load: {ckpt.stat().st_size / 2**20:.0f} MiB .ckpt vs "
          f"{converted.stat().st_size / 2**20:.0f} MiB .safetensors, {rounds} rounds")
    variants = {"ckpt": lambda: checkpoint.load_adapter_checkpoint(ckpt),
                "safetensors": lambda: checkpoint.load_adapter_checkpoint(converted)}
    cpu = common.alternate(variants, rounds)
    wall = common.Rounds(times={name: [] for name in variants})
    for _ in range(3):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            wall.times[name].append(time.perf_counter() - start)
    describe = checkpoint.describe(checkpoint.load_adapter_checkpoint(ckpt))
    return {"weights": describe, "bytes": {"ckpt": ckpt.stat().st_size, "safetensors": converted.stat().st_size},
            "cpu": cpu.as_json(), "ratio_safetensors_vs_ckpt": cpu.ratio("safetensors", "ckpt"),
            "wall_3_runs": wall.times, "contended": common.contended(cpu.loads)}


def face_encode(session: common.Session, ida, rounds: int) -> dict:
    from support.photos import astronaut_image

    face_detection = session.sub("adapter.face_detection")
    resampler_module = session.sub("adapter.resampler")
    node_module = session.sub("nodes.face_encode")
    node = session.nodes["FaceEncode"]
    photo = torch.from_numpy(astronaut_image()).float()[None] / 255.0  # (1,512,512,3)
    batch = photo.repeat(4, 1, 1, 1)
    aligned = face_detection.detect_and_align(ida.detector, photo[0].numpy(), "most confident", 0)
    crop = torch.from_numpy(aligned.crop).float()[None] / 255.0
    pixels = node_module.normalize_crops(crop)
    hidden = node_module.clip_penultimate(ida.clip_vision, pixels)

    def uncond():
        return resampler_module.uncond_tokens(lambda px: node_module.clip_penultimate(ida.clip_vision, px),
                                              lambda h: node_module.resample(ida, h), device="cpu")

    variants = {
        "detect+align": lambda: face_detection.detect_and_align(ida.detector, photo[0].numpy(), "most confident", 0),
        "clip_vision": lambda: node_module.clip_penultimate(ida.clip_vision, pixels),
        "resampler": lambda: node_module.resample(ida, hidden),
        "uncond_tokens": uncond,
        "FaceEncode_1": lambda: node.execute(ida, photo, "most confident", 0, "error"),
        "FaceEncode_4": lambda: node.execute(ida, batch, "most confident", 0, "error"),
    }
    print(f"\nFaceEncode and its parts (512x512 photo): {rounds} rounds")
    with torch.inference_mode():
        result = common.alternate(variants, rounds)
    stats = result.as_json()["stats"]
    per_image = (stats["FaceEncode_4"]["median"] - stats["FaceEncode_1"]["median"]) / 3
    return {"photo": list(photo.shape), "cpu": result.as_json(), "marginal_per_image_s": per_image,
            "contended": common.contended(result.loads)}


def rerun(session: common.Session) -> dict:
    from support.graphs import face_video_graph

    comfy = session.comfy
    comfy.server.client_id = "bench"  # PromptExecutor sends "executing" only to a client
    runs = {}
    for label, seed in (("first", 0), ("same graph again", 0), ("new seed", 1)):
        graph = face_video_graph(frames=2, seed=seed, prefix="bench_rerun")
        start, cpu = time.perf_counter(), time.process_time()
        result = comfy.run(graph)
        if not result.success:
            raise RuntimeError(f"{label}: {result.error_message}")
        cached = next((d["nodes"] for e, d in result.messages if e == "execution_cached"), [])
        # every node the outputs need either ran or is listed as cached (ComfyUI's execution_cached)
        executed = sorted(set(graph) - set(cached))
        runs[label] = {"executed": executed, "cached": sorted(cached), "wall_s": time.perf_counter() - start,
                       "cpu_s": time.process_time() - cpu,
                       "class_types": {n: graph[n]["class_type"] for n in executed}}
        print(f"  {label}: executed {executed or 'nothing'}; cached {sorted(cached)}")
    return runs


def main() -> None:
    parser = common.base_arguments(__doc__.splitlines()[0])
    args = parser.parse_args()
    session = common.start_comfy(args.device, args.attention)
    from support.graphs import ADAPTER, CLIP_VISION, DETECTOR

    common.set_threads(args.threads)
    start = time.process_time()
    ida = session.nodes["LoadIDAnimator"].execute(ADAPTER, CLIP_VISION, DETECTOR, "CPU").args[0]
    load_node_cpu = time.process_time() - start
    results = {"load_id_animator_node_cpu_s_first": load_node_cpu,
               "adapter_load": adapter_load(session, args.rounds),
               "face_encode": face_encode(session, ida, args.rounds)}
    print("\nsecond run of the same graph:")
    results["rerun"] = rerun(session)

    load = results["adapter_load"]
    rows = [[f"adapter load {name}", load["cpu"]["stats"][name]["median"],
             f"{load['cpu']['stats'][name]['min']:.3f}-{load['cpu']['stats'][name]['max']:.3f}",
             f"{min(load['cpu']['load_average_1min'])}-{max(load['cpu']['load_average_1min'])}"]
            for name in ("ckpt", "safetensors")]
    encode = results["face_encode"]["cpu"]
    rows += [[name, encode["stats"][name]["median"], f"{encode['stats'][name]['min']:.3f}-{encode['stats'][name]['max']:.3f}",
              f"{min(encode['load_average_1min'])}-{max(encode['load_average_1min'])}"] for name in encode["stats"]]
    common.print_table(f"Load and encode ({args.threads} thread(s), CPU seconds)",
                       ["what", "median s", "min-max s", "load 1min"], rows)
    print(f"  .safetensors / .ckpt load: {common.fmt_ratio(load['ratio_safetensors_vs_ckpt'])}; "
          f"FaceEncode marginal cost per extra photo: {results['face_encode']['marginal_per_image_s']:.2f} s")
    common.write_json("load_encode", {"machine": common.machine(args.device), "results": results}, args.out,
                      args.device)


if __name__ == "__main__":
    main()
