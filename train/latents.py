"""The latent cache: every `stride`-th frame of each video, encoded once with the SD1.5 VAE.

Encoding 16 frames at 512x512 online would add ~40% to each training step's FLOPs, so every frame
the trainer can use is encoded once here. What is stored is the VAE's diagonal Gaussian (its mean
and std, fp16), not one sample of it: the trainer draws a fresh latent `mean + std * eps` at
every step, as training on pixels would.

Clips (AnimateDiff's sampling): a clip is `--frames` frames taken every `--stride` frames of the
video (default 4, AnimateDiff's `sample_stride`: 16 frames cover ~2 s at 30 fps, the motion the
motion module learnt). The cache holds frames 0, stride, 2*stride, ... of each video, and the
trainer draws a new window of `--frames` consecutive stored frames at every draw (AnimateDiff's
loader draws a new start each time); overlapping windows share their encoded frames, so they
cost no extra encoding. Each frame: the centred square crop, resized to `--size` with PIL's
bicubic filter, RGB scaled to [-1, 1].

Folder (the contract with the trainer, see `LatentCache`), format 2:
- `meta.json`: the settings; a rerun with other settings is refused rather than mixed in;
- `shard-<n:05d>.safetensors`: per video `<k>.mean` and `<k>.std`, fp16 (N, 4, size/8, size/8)
  for its N stored frames; a shard ends at a video boundary;
- `index.jsonl`: one row per video {"id", "frames" (the video frame of each stored latent),
  "shard", "key"};
- `videos.jsonl`: one row per finished video (its stored frames, or why it was skipped). This is
  the commit record: a shard is written, then its index rows, then its videos' rows, so after an
  interruption the videos without a row are redone and index rows of unfinished videos dropped.

Format 1 (fixed, non-overlapping clips) cannot be migrated: its clips skip the frames between
one clip's end and the next one's start, so the frames of most windows were never encoded. The
trainer refuses such a cache and says to encode again.
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

FORMAT = 2  # 1: fixed clips (refused, see the module docstring)
DEFAULT_STRIDE = 4  # AnimateDiff's training.yaml sample_stride
# meta.json fields that decide the stored latents: a resume must match them all
SETTINGS = ("format", "frames", "stride", "size", "checkpoint", "checkpoint_bytes")


# --- Clips -----------------------------------------------------------------------------------------


def clip_span(frames: int, stride: int) -> int:
    """Frames of the video a clip covers, first to last."""
    return (frames - 1) * stride + 1


def stored_frames(total: int, stride: int) -> list[int]:
    """The frames of a `total`-frame video the cache encodes: 0, stride, 2*stride, ..."""
    return list(range(0, total, stride))


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


def read_stored(path: Path, frames: Sequence[int], size: int, chunk: int) -> Iterator[np.ndarray]:
    """The video's `frames`, centre-cropped and resized: uint8 (<= chunk, size, size, 3) pieces in
    order, in one decoding pass, never holding more than `chunk` frames."""
    from .video import read_frames

    piece: list[np.ndarray] = []
    expected = iter(frames)
    for index, frame in read_frames(path, frames):
        if index != next(expected):
            raise TrainingError(f"{path}: frame {index} came out of order; re-encode the video.")
        piece.append(centre_crop_resize(frame, size))
        if len(piece) == chunk:
            yield np.stack(piece)
            piece = []
    if piece:
        yield np.stack(piece)
    missing = next(expected, None)
    if missing is not None:
        raise TrainingError(f"{path} ended before frame {missing} (it decoded to fewer frames than it "
                            f"first counted).")


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
class CachedVideo:
    """One video of the cache: the video frame of each stored latent, and where they are."""

    video_id: str
    frames: tuple[int, ...]  # 0, stride, 2*stride, ...
    shard: str
    key: str

    def windows(self, length: int) -> int:
        """How many windows of `length` stored frames it holds (starts 0 .. N - length)."""
        return max(0, len(self.frames) - length + 1)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSONL file; a last line cut short by an interruption is ignored."""
    return read_jsonl(path, what="latent cache index", fix="delete the folder and encode again")


def _finished_videos(root: Path) -> dict[str, dict[str, Any]]:
    """video id -> its last row in videos.jsonl."""
    return {row["id"]: row for row in _read_jsonl(root / "videos.jsonl")}


class LatentCache:
    """A latent cache folder, read by the trainer. Shards are opened lazily and memory-mapped, once
    per process (DataLoader workers reopen them after fork); a window reads only its frames."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise TrainingError(f"{self.path} is not a latent cache (no meta.json); create one with "
                                f"`python -m id_animator.train latents VIDEOS --checkpoint SD15 --out {self.path}`.")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        check_format(self.path, self.meta)
        finished = {vid for vid, row in _finished_videos(self.path).items() if row.get("stored")}
        self.videos: list[CachedVideo] = [
            CachedVideo(row["id"], tuple(row["frames"]), row["shard"], row["key"])
            for row in _read_jsonl(self.path / "index.jsonl") if row["id"] in finished]
        self._handles: dict[str, Any] = {}
        self._pid = os.getpid()

    @property
    def scaling_factor(self) -> float:
        return float(self.meta["scaling_factor"])

    @property
    def window(self) -> int:
        """Frames per training clip (the latents command's --frames)."""
        return int(self.meta["frames"])

    @property
    def stride(self) -> int:
        return int(self.meta["stride"])

    def __len__(self) -> int:
        return len(self.videos)

    def _shard(self, name: str):
        from safetensors import safe_open

        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.path / name), "pt")
        return self._handles[name]

    def load(self, video: CachedVideo, start: int = 0, length: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), fp32 (length, 4, size/8, size/8): the unscaled VAE posterior of stored frames
        start .. start+length-1 (all when length is None); only those rows are read."""
        stop = len(video.frames) if length is None else start + length
        if not 0 <= start < stop <= len(video.frames):
            raise TrainingError(f"Frames {start}..{stop - 1} are outside the {len(video.frames)} stored "
                                f"frames of {video.video_id} in {self.path}.")
        shard = self._shard(video.shard)
        return (shard.get_slice(f"{video.key}.mean")[start:stop].float(),
                shard.get_slice(f"{video.key}.std")[start:stop].float())

    def sample(self, video: CachedVideo, start: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """A fresh latent of the window at `start`, scaled for the UNet: (mean + std * eps) * scaling_factor."""
        mean, std = self.load(video, start, self.window)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        return (mean + std * noise) * self.scaling_factor


def check_format(path: Path, meta: dict[str, Any]) -> None:
    """Refuse a cache of another format, saying what to do."""
    found = meta.get("format", 1)
    if found == FORMAT:
        return
    if found == 1:
        raise TrainingError(f"{path} is a latent cache of format 1 (fixed clips): it lacks the frames between "
                            f"its clips, so the trainer cannot draw random windows from it. Encode the videos "
                            f"again into a new folder: `python -m id_animator.train latents VIDEOS --checkpoint "
                            f"SD15 --out NEW_FOLDER` (same --frames, --stride and --size).")
    raise TrainingError(f"{path} is a latent cache of format {found!r}; this trainer reads format {FORMAT}. "
                        f"Update the pack, or encode the videos again with this version.")


# --- The command -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.split("\n\n")[0] + " Resumable: run the same command again to continue."
    parser.add_argument("videos", nargs="+", help="folders of videos (searched recursively), video files, "
                                                  "or .txt lists of video paths")
    parser.add_argument("--checkpoint", required=True, help="the SD1.5 single-file checkpoint whose VAE encodes "
                                                            "(the one you will train with)")
    parser.add_argument("--out", required=True, help="the latent cache folder (created; resumed if it exists)")
    parser.add_argument("--frames", type=int, default=16, help="frames per training clip (default 16, the "
                        "paper's); the cache stores every stride-th frame, a video needs at least this many")
    parser.add_argument("--stride", type=int, default=DEFAULT_STRIDE,
                        help=f"take every n-th frame inside a clip (default {DEFAULT_STRIDE}, AnimateDiff's "
                             f"sample_stride; 1 = consecutive frames)")
    parser.add_argument("--size", type=int, default=512, help="square side in pixels after the centre crop "
                                                              "(default 512; a multiple of 8)")
    parser.add_argument("--batch-size", type=int, default=16, help="frames per VAE forward pass (default 16)")
    parser.add_argument("--shard-size", type=int, default=2048,
                        help="stored frames per shard file (default 2048, ~128 MiB at 512; a shard ends at a "
                             "video boundary)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device for the VAE (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="VAE compute precision (default fp32; bf16 is faster on a GPU. SD1.5's VAE can "
                             "overflow in fp16). Latents are stored in fp16 either way")


def _validate(args: argparse.Namespace) -> None:
    for name, minimum in (("frames", 1), ("stride", 1), ("size", 8), ("batch_size", 1), ("shard_size", 1)):
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
            "size": args.size, "scaling_factor": scaling_factor,
            "checkpoint": checkpoint.name, "checkpoint_bytes": checkpoint.stat().st_size,
            "latent_channels": 4, "dtype": "float16", "stored": "VAE posterior mean and std, unscaled, of every stride-th frame",
            "crop": "centred square, PIL bicubic resize, RGB in [-1, 1]", "vae_dtype": args.dtype}


def _start_folder(root: Path, settings: dict[str, Any]) -> None:
    """Create the folder, or check that an existing cache was made with the same settings, and drop
    index rows of videos that never finished (an interrupted shard)."""
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / "meta.json"
    if meta_path.exists():
        check_format(root, json.loads(meta_path.read_text()))
    refuse_other_settings(meta_path, settings, what=f"{root} (latents)", keys=list(SETTINGS),
                          fix="Use another --out folder, or delete this one to start again.")
    finished = _finished_videos(root)
    index = [row for row in _read_jsonl(root / "index.jsonl")
             if row["id"] in finished and finished[row["id"]].get("shard") == row["shard"]]
    write_atomic(root / "index.jsonl", "".join(json.dumps(row) + "\n" for row in index))
    write_atomic(root / "videos.jsonl", "".join(json.dumps(row) + "\n" for row in finished.values()))


class _ShardWriter:
    """Buffers finished videos' latents and writes them as one shard, then commits them."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root, self.shard_size = root, shard_size
        used = [int(row["shard"][6:11]) for row in _read_jsonl(root / "index.jsonl")]
        self.number = max(used, default=-1) + 1  # an orphan shard of an interrupted run is overwritten
        self.tensors: dict[str, torch.Tensor] = {}
        self.index: list[dict[str, Any]] = []
        self.videos: list[dict[str, Any]] = []
        self.stored = 0  # frames buffered

    @property
    def name(self) -> str:
        return f"shard-{self.number:05d}.safetensors"

    def add_video(self, video_row: dict[str, Any], frames: list[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        key = str(len(self.index))
        self.tensors[f"{key}.mean"] = mean.to(torch.float16).contiguous()
        self.tensors[f"{key}.std"] = std.to(torch.float16).contiguous()
        self.index.append({"id": video_row["id"], "frames": frames, "shard": self.name, "key": key})
        self.videos.append(dict(video_row, shard=self.name, stored=len(frames)))
        self.stored += len(frames)
        if self.stored >= self.shard_size:
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
        self.tensors, self.index, self.videos, self.stored = {}, [], [], 0


def run(args: argparse.Namespace) -> int:
    from .sd15 import SD15_VAE_CONFIG, load_vae
    from .video import find_videos

    _validate(args)
    videos = find_videos(args.videos)
    root = Path(args.out)
    settings = _settings(args, SD15_VAE_CONFIG["scaling_factor"])
    _start_folder(root, settings)  # before the model loads: a settings clash is told at once
    vae = load_vae(args.checkpoint, dtype=DTYPES[args.dtype], device=args.device)
    encode_videos(vae, videos, root, args)
    _report(root, videos)
    return 0


def encode_videos(vae: Any, videos: Sequence[Any], root: Path, args: argparse.Namespace) -> None:
    """Encode the videos not yet finished in `root` (a folder `_start_folder` prepared) with `vae`:
    every `args.stride`-th frame, `args.batch_size` frames per VAE pass, committed per shard."""
    from tqdm import tqdm

    from .video import frame_count

    finished = _finished_videos(root)
    todo = [v for v in videos if v.id not in finished or finished[v.id].get("retry")]
    log.info("%d videos, %d already done, %d to encode", len(videos), len(videos) - len(todo), len(todo))
    writer = _ShardWriter(root, args.shard_size)
    encoded, started = 0, time.monotonic()
    bar = tqdm(todo, desc="latents", unit="video", dynamic_ncols=True)
    for video in bar:
        row: dict[str, Any] = {"id": video.id, "video": str(video.path)}
        try:
            total = frame_count(video.path)
            frames = stored_frames(total, args.stride)
            row["frames"] = total
            if len(frames) < args.frames:
                row["skipped"] = (f"too short: {total} frames, a clip of {args.frames} frames at stride "
                                  f"{args.stride} needs {clip_span(args.frames, args.stride)}")
                writer.videos.append(dict(row, shard=None, stored=0))
                continue
            pieces = [encode_frames(vae, pixels, args.batch_size)
                      for pixels in read_stored(video.path, frames, args.size, args.batch_size)]
        except TrainingError as error:  # unreadable: listed, and retried by the next run
            row["skipped"], row["retry"] = str(error), True
            writer.videos.append(dict(row, shard=None, stored=0))
            log.warning("skipped %s: %s", video.id, error)
            continue
        writer.add_video(row, frames, torch.cat([m for m, _ in pieces]), torch.cat([d for _, d in pieces]))
        encoded += len(frames)
        bar.set_postfix(frames=encoded, s_per_frame=f"{(time.monotonic() - started) / encoded:.3f}")
    writer.flush()


def _report(root: Path, videos: Sequence[Any]) -> None:
    finished = _finished_videos(root)
    skipped = {vid: row["skipped"] for vid, row in finished.items() if row.get("skipped")}
    stored = sum(row.get("stored") or 0 for row in finished.values())
    for vid, reason in sorted(skipped.items()):
        print(f"skipped {vid}: {reason}", flush=True)
    print(f"{stored} frames from {len(finished) - len(skipped)} videos in {root} ({len(skipped)} skipped)",
          flush=True)
    if stored == 0:
        raise TrainingError(f"No frame was encoded from {len(videos)} videos: every video was skipped (see above).")
