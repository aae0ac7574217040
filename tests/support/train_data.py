"""Training data written in the formats of the latents, pool and captions commands, for tests and
benchmarks that read it back with the trainer's own loaders.

- `write_latent_cache`: meta.json, shards of fp16 `<k>.mean` / `<k>.std` (every stored frame of
  a video), index.jsonl and the videos.jsonl commit record (train/latents.py, format 2);
- `write_pool`: videos/<id>.json and 224x224 PNG crops (train/face_pool.py);
- `write_captions`: captions.jsonl (train/captions.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file

SCALING_FACTOR = 0.18215  # SD1.5's VAE
Moments = Callable[[tuple[int, ...]], tuple[torch.Tensor, torch.Tensor]]


def gaussian_moments(seed: int = 0, *, mean: float | None = None, std: float | None = None,
                     std_scale: float = 1.0) -> Moments:
    """shape -> a clip's (mean, std): the given constants, else mean ~ N(0, 1) and
    std ~ std_scale * U(0, 1), drawn clip after clip (mean, then std) from one generator."""
    generator = torch.Generator().manual_seed(seed)

    def moments(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        m = torch.full(shape, mean) if mean is not None else torch.randn(shape, generator=generator)
        s = torch.full(shape, std) if std is not None else std_scale * torch.rand(shape, generator=generator)
        return m, s

    return moments


def write_latent_cache(folder: Path, videos: Iterable[tuple[str, Sequence[int]]], moments: Moments, *,
                       frames: int, side: int, checkpoint: str, stride: int = 1,
                       scaling_factor: float = SCALING_FACTOR, shard_videos: int | None = None) -> Path:
    """LATENTS (format 2): each (video id, stored frames) video gets (len(stored frames), 4, side,
    side) tensors from `moments`, stored fp16; a shard holds `shard_videos` videos (all when
    None). `frames` (the training window) and `stride` are meta.json's settings."""
    folder.mkdir(parents=True)
    rows, tensors, shard, stored = [], {}, 0, {}
    for video_id, video_frames in videos:
        key = str(len(tensors) // 2)
        mean, std = moments((len(video_frames), 4, side, side))
        tensors[f"{key}.mean"], tensors[f"{key}.std"] = mean.half(), std.half()
        rows.append({"id": video_id, "frames": list(video_frames), "shard": f"shard-{shard:05d}.safetensors",
                     "key": key})
        stored[video_id] = len(video_frames)
        if len(tensors) // 2 == shard_videos:
            save_file(tensors, str(folder / f"shard-{shard:05d}.safetensors"))
            shard, tensors = shard + 1, {}
    if tensors:
        save_file(tensors, str(folder / f"shard-{shard:05d}.safetensors"))
    (folder / "index.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "videos.jsonl").write_text("".join(json.dumps({"id": v, "stored": n}) + "\n"  # the commit record
                                                 for v, n in stored.items()))
    (folder / "meta.json").write_text(json.dumps({"format": 2, "frames": frames, "stride": stride,
                                                  "size": side * 8, "scaling_factor": scaling_factor,
                                                  "checkpoint": checkpoint}))
    return folder


def write_pool(folder: Path, faces: Mapping[str, Sequence[int]], crop: Callable[[str, int], Image.Image],
               dropped: Collection[str] = ()) -> Path:
    """POOL: for each video id its faces' frames, each crop `crop(video_id, frame)` saved as the pool
    command saves it (PNG level 1). A video in `dropped` keeps its crops but its record has no face
    and a reason. Boxes, scores and keypoints are placeholders (the trainer reads no box)."""
    for video_id, frames in faces.items():
        entries = []
        for frame in frames:
            name = f"crops/{video_id}/{frame:06d}.png"
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            crop(video_id, frame).save(folder / name, compress_level=1)
            entries.append({"frame": frame, "box": [0, 0, 10, 10], "score": 0.9, "crop": name, "kps": []})
        is_dropped = video_id in dropped
        record = {"video": f"{video_id}.mp4", "id": video_id, "seed": 0, "frames": 100,
                  "faces": [] if is_dropped else entries, "rejected": {"no_face": 0, "several_faces": 0},
                  "tried": len(frames), "dropped": "no single-face frame" if is_dropped else None}
        path = folder / "videos" / f"{video_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))
    return folder


def write_captions(path: Path, captions: Mapping[str, str]) -> Path:
    """CAPTIONS: one row per video id, without attribute and action."""
    path.write_text("".join(json.dumps({"id": k, "caption": v, "attribute": None, "action": None}) + "\n"
                            for k, v in captions.items()))
    return path
