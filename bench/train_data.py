"""Training data path: clips/s from the latent cache and face draws/s, on one core.

A cache and a pool at the paper's size (every 4th frame of each video at 512x512: latents 4x64x64
per frame, the VAE's mean and std in fp16, 1 MiB per 16-frame window; 5 crops of 224x224 per
video, PNG) are written in the
formats of train/latents.py and train/face_pool.py, then read through the trainer's own classes
(`LatentCache`, `load_pool`, `TrainingSet`, `collate`) in one process, one torch thread:
- clips: `LatentCache.sample` (read a random window's rows of the shard's two tensors, draw
  mean + std·e, scale);
- faces: `read_crop` of a reference drawn from the video's pool (PNG decode);
- items: `TrainingSet.draw` (both, plus noise and the draws) and `collate` into batches of 2.
Shards are read warm (the files in the OS page cache, as after the first epoch); each rate is the
median of the rounds. An A100 at ~0.6 s/step (training.md §4; ~2 steps/s is the upper bound the
goal is set against) needs 2 steps/s x 2 clips = 4 clips/s; the goal is 10x that: 40 clips/s.

    python bench/train_data.py
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from id_animator.train.captions import load_captions
from id_animator.train.data import TrainingSet, collate, read_crop
from id_animator.train.face_pool import load_pool
from id_animator.train.latents import LatentCache
from support.train_data import gaussian_moments, write_captions, write_latent_cache, write_pool

FRAMES, SIDE, STRIDE, SCALE = 16, 64, 4, 0.18215
GOAL_CLIPS_PER_S = 40.0


def write_dataset(root: Path, videos: int, clips_per_video: int, shard_videos: int = 64) -> None:
    """LATENTS, POOL and captions.jsonl in the trainer's formats, random content: 5 crops per video,
    each the astronaut's face with its own noise."""
    from support.photos import astronaut_image

    ids = [f"v{v:04d}" for v in range(videos)]
    stored = [(video_id, list(range(0, FRAMES * clips_per_video * STRIDE, STRIDE))) for video_id in ids]
    write_latent_cache(root / "latents", stored, gaussian_moments(0), frames=FRAMES, side=SIDE, stride=STRIDE,
                       checkpoint="random", scaling_factor=SCALE, shard_videos=shard_videos)
    face = np.asarray(Image.fromarray(astronaut_image()).resize((224, 224), Image.BICUBIC))
    rng = np.random.default_rng(0)

    def noisy_face(video_id: str, frame: int) -> Image.Image:
        return Image.fromarray(np.clip(face.astype(int) + rng.integers(-8, 9, face.shape), 0, 255).astype(np.uint8))

    write_pool(root / "pool", {video_id: range(5) for video_id in ids}, noisy_face)
    write_captions(root / "captions.jsonl", {f"v{v:04d}": f"a person, number {v}, talking" for v in range(videos)})


def rate(fn: Callable[[int], Any], count: int, rounds: int) -> dict[str, float]:
    """Calls per second of fn(i) for i in range(count): median and min-max over rounds (CPU time)."""
    rates = []
    for r in range(rounds + 1):
        start = time.process_time()
        for i in range(count):
            fn(i + r * count)
        if r:  # round 0 warms the page cache and the allocator
            rates.append(count / (time.process_time() - start))
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=64)
    parser.add_argument("--clips-per-video", type=int, default=2, help="non-overlapping windows per video")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=common.RESULTS / "train_data.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_dataset(root, args.videos, args.clips_per_video)
        cache = LatentCache(root / "latents")
        pool = load_pool(root / "pool")
        data = TrainingSet(cache, pool, load_captions(root / "captions.jsonl"), seed=0)
        n = len(data)
        faces = [face for video in pool.values() for face in video]
        g = torch.Generator().manual_seed(1)
        results = {
            "clips_per_s": rate(lambda i: cache.sample(cache.videos[i % len(cache)], i % FRAMES, g), n, args.rounds),
            "face_draws_per_s": rate(lambda i: read_crop(faces[i % len(faces)].crop), len(faces), args.rounds),
            "items_per_s": rate(lambda i: data.draw(0, i % n), n, args.rounds),
            "batches_of_2_per_s": rate(lambda i: collate([data.draw(1, 2 * i % n), data.draw(1, (2 * i + 1) % n)]),
                                       n // 2, args.rounds),
        }
    report = {"command": "python bench/train_data.py " + " ".join(sys.argv[1:]), "machine": common.machine(), "shape": {"frames": FRAMES, "latent": SIDE, "clips": n,
              "faces": len(faces)}, "goal_clips_per_s": GOAL_CLIPS_PER_S, "load_average_1min": common.load_average(),
              **results}
    for name, r in results.items():
        print(f"{name}: {r['median']:.1f}/s ({r['min']:.1f}-{r['max']:.1f})")
    print(f"goal: >= {GOAL_CLIPS_PER_S:.0f} clips/s (10x an A100's ~2 steps/s at batch 2); "
          f"whole items: {results['items_per_s']['median'] / GOAL_CLIPS_PER_S:.1f}x the goal")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
