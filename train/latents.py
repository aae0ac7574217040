"""The latent cache: clips of N frames, encoded once with the SD1.5 VAE, stored in shards.

Encoding 16 frames at 512x512 online would add ~40% to each training step's FLOPs, so every clip
is encoded once here. What is stored is the VAE's diagonal Gaussian (its mean and std, fp16), not
one sample of it: the trainer draws a fresh latent `mean + std * eps` at every step, as training
on pixels would.

Clips (AnimateDiff's sampling, made deterministic): `--frames` frames taken every `--stride`
frames of the video (default 4, AnimateDiff's `sample_stride`: 16 frames cover ~2 s at 30 fps,
the motion the motion module learnt); a clip starts every `--clip-step` frames (default: where
the previous clip's span ends, so clips do not overlap), at most `--clips-per-video` of them
spread evenly over the video. Each frame: the centred square crop, resized to `--size` with
PIL's bicubic filter, RGB scaled to [-1, 1].

Folder (the contract with the trainer, see `LatentCache`):
- `meta.json`: the settings; a rerun with other settings is refused rather than mixed in;
- `shard-<n:05d>.safetensors`: per clip `<k>.mean` and `<k>.std`, fp16 (F, 4, size/8, size/8);
  a shard ends at a video boundary, so a video's clips live in one shard;
- `index.jsonl`: one row per clip {"clip": "<id>@<start>", "id", "frames", "shard", "key"};
- `videos.jsonl`: one row per finished video (its clips, or why it was skipped). This is the
  commit record: a shard is written, then its index rows, then its videos' rows, so after an
  interruption the videos without a row are redone and index rows of unfinished videos dropped.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..adapter.errors import TrainingError
from ..adapter.files import append_jsonl, atomic_path, read_jsonl, refuse_other_settings, write_atomic
from ..adapter.weights_file import DTYPES

log = logging.getLogger(__name__)

FORMAT = 1
DEFAULT_STRIDE = 4  # AnimateDiff's training.yaml sample_stride
# meta.json fields that decide the stored latents: a resume must match them all
SETTINGS = ("format", "frames", "stride", "clip_step", "clips_per_video", "size", "checkpoint", "checkpoint_bytes")


# --- Clips -----------------------------------------------------------------------------------------


def clip_span(frames: int, stride: int) -> int:
    """Frames of the video a clip covers, first to last."""
    return (frames - 1) * stride + 1


def clip_starts(total: int, frames: int, stride: int, clip_step: int | None = None,
                clips_per_video: int | None = None) -> list[int]:
    """First frame of each clip of a `total`-frame video; empty when the video is too short."""
    span = clip_span(frames, stride)
    starts = list(range(0, total - span + 1, clip_step or span))
    if clips_per_video is not None and len(starts) > clips_per_video:
        picks = np.linspace(0, len(starts) - 1, clips_per_video).round().astype(int)
        starts = [starts[i] for i in picks]
    return starts


def clip_frames(start: int, frames: int, stride: int) -> list[int]:
    return [start + i * stride for i in range(frames)]


def centre_crop_resize(frame: np.ndarray, size: int) -> np.ndarray:
    """RGB uint8 (H, W, 3) -> (size, size, 3): the centred square, resized with PIL bicubic."""
    from PIL import Image

    height, width = frame.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = np.ascontiguousarray(frame[top:top + side, left:left + side])
    if side == size:
        return square
    return np.asarray(Image.fromarray(square).resize((size, size), Image.BICUBIC))


def read_clips(path: Path, starts: Sequence[int], frames: int, stride: int, size: int
               ) -> Iterator[tuple[int, np.ndarray]]:
    """(start, uint8 (F, size, size, 3)) per clip, in one decoding pass, holding only the frames
    a clip still to come needs."""
    from .video import read_frames

    wanted = sorted({f for s in starts for f in clip_frames(s, frames, stride)})
    pending = list(starts)
    kept: dict[int, np.ndarray] = {}
    for index, frame in read_frames(path, wanted):
        kept[index] = centre_crop_resize(frame, size)
        while pending and clip_frames(pending[0], frames, stride)[-1] <= index:
            start = pending.pop(0)
            indices = clip_frames(start, frames, stride)
            missing = [i for i in indices if i not in kept]
            if missing:
                raise TrainingError(f"{path}: frames {missing[:3]} could not be decoded.")
            yield start, np.stack([kept[i] for i in indices])
            first_needed = pending[0] if pending else index + 1
            kept = {i: f for i, f in kept.items() if i >= first_needed}
    if pending:
        raise TrainingError(f"{path} ended before frame {clip_frames(pending[0], frames, stride)[-1]} "
                            f"(it decoded to fewer frames than it first counted).")


# --- Encoding --------------------------------------------------------------------------------------


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def encode_frames(vae, frames: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each frame: (mean, std), each (N, 4, H/8, W/8), in the VAE's dtype,
    `batch_size` frames per forward pass."""
    param = next(vae.parameters())
    means, stds = [], []
    with torch.no_grad():
        for chunk in range(0, len(frames), batch_size):
            pixels = to_pixels(frames[chunk:chunk + batch_size]).to(param.device, param.dtype)
            posterior = vae.encode(pixels).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


# --- The cache folder ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    name: str  # "<video_id>@<start>"
    video_id: str
    frames: tuple[int, ...]
    shard: str
    key: str


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a last line cut short by an interruption is ignored."""
    return read_jsonl(path, what="latent cache index", fix="delete the folder and encode again")


def _finished_videos(root: Path) -> dict[str, dict[str, Any]]:
    """video id -> its last row in videos.jsonl."""
    return {row["id"]: row for row in _read_jsonl(root / "videos.jsonl")}


class LatentCache:
    """A latent cache folder, read by the trainer. Shards are opened lazily and memory-mapped, once
    per process (DataLoader workers reopen them after fork)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise TrainingError(f"{self.path} is not a latent cache (no meta.json); create one with "
                                f"`python -m id_animator.train latents VIDEOS --checkpoint SD15 --out {self.path}`.")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        finished = {vid for vid, row in _finished_videos(self.path).items() if row.get("clips")}
        self.clips: list[Clip] = [
            Clip(row["clip"], row["id"], tuple(row["frames"]), row["shard"], row["key"])
            for row in _read_jsonl(self.path / "index.jsonl") if row["id"] in finished]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    @property
    def scaling_factor(self) -> float:
        return float(self.meta["scaling_factor"])

    def __len__(self) -> int:
        return len(self.clips)

    def _shard(self, name: str):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), "pt")
        return self._handles[name]

    def load(self, clip: Clip) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), fp32 (F, 4, size/8, size/8): the unscaled VAE posterior of each frame."""
        shard = self._shard(clip.shard)
        return shard.get_tensor(f"{clip.key}.mean").float(), shard.get_tensor(f"{clip.key}.std").float()

    def sample(self, clip: Clip, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh latent of the clip, scaled for the UNet: (mean + std * eps) * scaling_factor."""
        mean, std = self.load(clip)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


# --- The command -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] + " Resumable: run the same command again to continue."
    parser.add_argument("videos", nargs="+", help="folders of videos (searched recursively), video files, "
                                                  "or .txt lists of video paths")
    parser.add_argument("--checkpoint", required=True, help="the SD1.5 single-file checkpoint whose VAE encodes "
                                                            "(the one you will train with)")
    parser.add_argument("--out", required=True, help="the latent cache folder (created; resumed if it exists)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16, the paper's)")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help=f"take every n-th frame inside a clip (default {DEFAULT_STRIDE}, AnimateDiff's "
                             f"sample_stride; 1 = consecutive frames)")
    parser.add_argument("--clip-step", type=int, default=None,
                        help="frames between clip starts (default: the clip's span, (frames-1)*stride+1, "
                             "so clips do not overlap)")
    parser.add_argument("--clips-per-video", type=int, default=None,
                        help="at most this many clips per video, spread evenly (default: all)")
    parser.add_argument("--size", type=int, default=512, help="square side in pixels after the centre crop "
                                                              "(default 512; a multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per VAE forward pass (default 16)")
    parser.add_argument("--shard-size", type=int, default=128,
                        help="clips per shard file (default 128, ~128 MiB at 512; a shard ends at a video boundary)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the VAE (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="VAE compute precision (default fp32; bf16 is faster on a GPU. SD1.5's VAE can "
                             "overflow in fp16). Latents are stored in fp16 either way")


def _validate(args: argparse.Namespace) -> None:
    for name, minimum in (("frames", 1), ("stride", 1), ("clip_step", 1), ("clips_per_video", 1),
                          ("size", 8), ("batch_size", 1), ("shard_size", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise TrainingError(f"--{name.replace('_', '-')} must be at least {minimum}, got {value}.")
    if args.size % 8:
        raise TrainingError(f"--size must be a multiple of 8 (the VAE downsamples by 8), got {args.size}.")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise TrainingError(f"--checkpoint {checkpoint} does not exist; give your SD1.5 checkpoint file.")


def _settings(args: argparse.Namespace, scaling_factor: float) -> dict[str, Any]:
    checkpoint = Path(args.checkpoint)
    return {"format": FORMAT, "frames": args.frames, "stride": args.stride,
            "clip_step": args.clip_step or clip_span(args.frames, args.stride),
            "clips_per_video": args.clips_per_video, "size": args.size, "scaling_factor": scaling_factor,
            "checkpoint": checkpoint.name, "checkpoint_bytes": checkpoint.stat().st_size,
            "latent_channels": 4, "dtype": "float16", "stored": "VAE posterior mean and std, unscaled",
            "crop": "centred square, PIL bicubic resize, RGB in [-1, 1]", "vae_dtype": args.dtype}


def _start_folder(root: Path, settings: dict[str, Any]) -> None:
    """Create the folder, or check that an existing cache was made with the same settings, and drop
    index rows of videos that never finished (an interrupted shard)."""
    root.mkdir(parents=True, exist_ok=True)
    refuse_other_settings(root / "meta.json", settings, what=f"{root} (latents)", keys=list(SETTINGS),
                          fix="Use another --out folder, or delete this one to start again.")
    finished = _finished_videos(root)
    index = [row for row in _read_jsonl(root / "index.jsonl")
             if row["id"] in finished and finished[row["id"]].get("shard") == row["shard"]]
    write_atomic(root / "index.jsonl", "".join(json.dumps(row) + "\n" for row in index))
    write_atomic(root / "videos.jsonl", "".join(json.dumps(row) + "\n" for row in finished.values()))


class _ShardWriter:
    """Buffers finished videos' clips and writes them as one shard, then commits them."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root, self.shard_size = root, shard_size
        used = [int(row["shard"][6:11]) for row in _read_jsonl(root / "index.jsonl")]
        self.number = max(used, default=-1) + 1  # an orphan shard of an interrupted run is overwritten
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: list[dict[str, Any]] = []
        self.videos: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}.safetensors"

    def add_video(self, video_row: dict[str, Any], clips: list[tuple[int, list[int], torch.Tensor, torch.Tensor]]
                  ) -> None:
        for start, frames, mean, std in clips:
            key = str(len(self.index))
            self.tensors[f"{key}.mean"] = mean.to(torch.float16).contiguous()
            self.tensors[f"{key}.std"] = std.to(torch.float16).contiguous()
            self.index.append({"clip": f"{video_row['id']}@{start}", "id": video_row["id"], "frames": frames,
                               "shard": self.name, "key": key})
        self.videos.append(dict(video_row, shard=self.name, clips=len(clips)))
        if len(self.index) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.videos:
            return
        from safetensors.torch import save_file

        if self.index:  # skipped videos alone need no shard
            with atomic_path(self.root / self.name) as tmp:
                save_file(self.tensors, str(tmp), metadata={"format": str(FORMAT)})
            append_jsonl(self.root / "index.jsonl", self.index)
            self.number += 1
        append_jsonl(self.root / "videos.jsonl", self.videos)  # the commit
        self.tensors, self.index, self.videos = {}, [], []


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .sd15 import SD15_VAE_CONFIG, load_vae
    from .video import find_videos, frame_count

    _validate(args)
    videos = find_videos(args.videos)
    root = Path(args.out)
    settings = _settings(args, SD15_VAE_CONFIG["scaling_factor"])
    _start_folder(root, settings)  # before the model loads: a settings clash is told at once
    vae = load_vae(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    finished = _finished_videos(root)
    todo = [v for v in videos if v.id not in finished or finished[v.id].get("retry")]
    log.info("%d videos, %d already done, %d to encode", len(videos), len(videos) - len(todo), len(todo))
    writer = _ShardWriter(root, args.shard_size)
    clips_per_call = max(1, args.batch_size // args.frames)
    encoded, started = 0, time.monotonic()
    bar = tqdm(todo, desc="latents", unit="video", dynamic_ncols=True)
    for video in bar:
        row: dict[str, Any] = {"id": video.id, "video": str(video.path)}
        try:
            total = frame_count(video.path)
            starts = clip_starts(total, args.frames, args.stride, settings["clip_step"], args.clips_per_video)
            row["frames"] = total
            if not starts:
                row["skipped"] = (f"too short: {total} frames, a clip of {args.frames} frames at stride "
                                  f"{args.stride} needs {clip_span(args.frames, args.stride)}")
                writer.videos.append(dict(row, shard=None, clips=0))
                continue
            clips, group = [], []
            for start, pixels in read_clips(video.path, starts, args.frames, args.stride, args.size):
                group.append((start, pixels))
                if len(group) == clips_per_call or start == starts[-1]:
                    mean, std = encode_frames(vae, np.concatenate([p for _, p in group]), args.batch_size)
                    for i, (s, _) in enumerate(group):
                        part = slice(i * args.frames, (i + 1) * args.frames)
                        clips.append((s, clip_frames(s, args.frames, args.stride), mean[part], std[part]))
                    group = []
        except TrainingError as error:  # unreadable: listed, and retried by the next run
            row["skipped"], row["retry"] = str(error), True
            writer.videos.append(dict(row, shard=None, clips=0))
            log.warning("skipped %s: %s", video.id, error)
            continue
        writer.add_video(row, clips)
        encoded += len(clips)
        bar.set_postfix(clips=encoded, s_per_clip=f"{(time.monotonic() - started) / encoded:.2f}")
    writer.flush()
    _report(root, videos)
    return 0


def _report(root: Path, videos: Sequence[Any]) -> None:
    finished = _finished_videos(root)
    skipped = {vid: row["skipped"] for vid, row in finished.items() if row.get("skipped")}
    clips = sum(row.get("clips") or 0 for row in finished.values())
    for vid, reason in sorted(skipped.items()):
        print(f"skipped {vid}: {reason}", flush=True)
    print(f"{clips} clips from {len(finished) - len(skipped)} videos in {root} ({len(skipped)} skipped)", flush=True)
    if clips == 0:
        raise TrainingError(f"No clip was encoded from {len(videos)} videos: every video was skipped (see above).")
