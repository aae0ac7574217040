"""The `latents` command with the test bed's full-size random SD1.5 checkpoint, at 64x64 on CPU:
synthetic videos whose frames carry their index (tests/support/videos.py) -> index rows with every
stride-th frame of each video, each stored once; the stored mean and std equal the checkpoint VAE's posterior on the same
centre-cropped pixels (fp32 within 1e-5 before storage; storage is one fp16 rounding); a rerun
skips finished work and an interrupted shard is redone; too-short and unreadable videos are
listed. Prints the encoding time per frame and the cache's window read rate (clips/s) for BENCHMARKS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from id_animator.train.latents import LatentCache, centre_crop_resize, encode_frames, stored_frames, to_pixels
from id_animator.train.video import read_frames
from support.videos import indexed_frames, write_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHECKPOINT = ("checkpoints", "sd15_random_full.safetensors")
FRAMES, STRIDE, SIZE = 4, 3, 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    write_video(folder / "a.mp4", indexed_frames(30, size=(64, 192), seed=1))  # wide: the crop takes the centre
    write_video(folder / "people" / "b.mp4", indexed_frames(12, size=(96, 80), seed=2))  # tall, resized to 64
    write_video(folder / "short.mp4", indexed_frames(6, seed=3))
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is no video")
    return folder


def latents_cli(import_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "id_animator.train", "latents", *map(str, args)], env=env,
                          cwd=import_root, capture_output=True, text=True, timeout=900)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def cache(import_root: Path, model_files, videos: Path, tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("latents") / "cache"
    started = time.monotonic()
    result = latents_cli(import_root, videos, "--checkpoint", model_files[CHECKPOINT[0]][CHECKPOINT[1]],
                         "--out", out, "--frames", FRAMES, "--stride", STRIDE, "--size", SIZE, "--batch-size", 8,
                         "--shard-size", 3)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, time.monotonic() - started, result.stdout


def test_index_lists_every_stride_th_frame_once_and_skipped_videos(cache):
    out, _, stdout = cache
    index = rows(out / "index.jsonl")
    assert [row["id"] for row in index] == ["a", "people/b"]
    assert index[0]["frames"] == stored_frames(30, STRIDE) == list(range(0, 30, STRIDE))  # 10 frames, 7 windows
    assert index[1]["frames"] == stored_frames(12, STRIDE) == [0, 3, 6, 9]  # exactly one window
    assert [row["shard"] for row in index] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    videos = {row["id"]: row for row in rows(out / "videos.jsonl")}
    assert videos["short"]["skipped"].startswith("too short: 6 frames") and videos["short"]["stored"] == 0
    assert "Cannot read" in videos["broken"]["skipped"] and videos["broken"]["retry"]
    assert "skipped short: too short" in stdout and "skipped broken" in stdout and "14 frames from 2 videos" in stdout
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["format"], meta["frames"], meta["stride"], meta["size"], meta["scaling_factor"]) == \
        (2, FRAMES, STRIDE, SIZE, 0.18215)


def test_stored_posterior_equals_the_vae_on_the_same_pixels(cache, model_files, videos: Path):
    from id_animator.train.sd15 import load_vae

    out, seconds, _ = cache
    latents = LatentCache(out)
    video = next(v for v in latents.videos if v.video_id == "a")
    pixels = np.stack([centre_crop_resize(frame, SIZE) for _, frame in read_frames(videos / "a.mp4", video.frames)])
    vae = load_vae(model_files[CHECKPOINT[0]][CHECKPOINT[1]])
    with torch.no_grad():
        posterior = vae.encode(to_pixels(pixels)).latent_dist
        again = vae.encode(to_pixels(pixels)).latent_dist
    assert torch.equal(posterior.mean, again.mean)  # encoding is deterministic
    started = time.perf_counter()
    command_mean, command_std = encode_frames(vae, pixels, batch_size=8)  # the command's path, before storage
    per_frame = (time.perf_counter() - started) / len(pixels)
    assert rel_err(command_mean, posterior.mean) <= 1e-5 and rel_err(command_std, posterior.std) <= 1e-5
    mean, std = latents.load(video)
    assert mean.shape == std.shape == (10, 4, SIZE // 8, SIZE // 8) and mean.dtype == torch.float32
    # the command's fp32 result, rounded once to fp16, is what is stored: within one fp16 ulp
    assert rel_err(mean, posterior.mean) <= 1e-3 and rel_err(std, posterior.std) <= 1e-3
    assert torch.equal(mean, posterior.mean.half().float()) or \
        ((mean - posterior.mean).abs() <= posterior.mean.abs() * 2 ** -10 + 2 ** -24).all()
    assert (std > 0).all()
    window = latents.load(video, 3, FRAMES)  # a training window: stored frames 3..6 = video frames 9..18
    assert torch.equal(window[0], mean[3:3 + FRAMES]) and torch.equal(window[1], std[3:3 + FRAMES])
    # pixel check of the crop: the wide frame's centre third, never its stamped left edge
    frame = next(f for _, f in read_frames(videos / "a.mp4", [9]))
    assert np.array_equal(pixels[3], frame[:, 64:128])
    print(f"latent encoding at {SIZE}x{SIZE} on CPU (1 thread): VAE {per_frame:.3f} s/frame; whole command "
          f"{seconds / 14:.2f} s per stored frame incl. model load")


def test_rerun_skips_finished_work_and_redoes_an_interrupted_shard(cache, import_root: Path, model_files, videos):
    out, _, _ = cache
    args = [videos, "--checkpoint", model_files[CHECKPOINT[0]][CHECKPOINT[1]], "--out", out, "--frames", FRAMES,
            "--stride", STRIDE, "--size", SIZE, "--batch-size", 8, "--shard-size", 3]
    shards = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.safetensors")}
    result = latents_cli(import_root, *args)
    assert result.returncode == 0 and "1 to encode" in result.stderr, result.stderr[-2000:]  # only the broken one
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.glob("shard-*.safetensors")} == shards

    # interrupted after shard 1 was written and indexed, before its video was committed
    lines = (out / "videos.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["id"] != "people/b"]
    (out / "videos.jsonl").write_text("\n".join(kept) + "\n")
    index_before = (out / "index.jsonl").read_text()
    assert len(LatentCache(out)) == 1  # readers see only committed videos
    result = latents_cli(import_root, *args)
    assert result.returncode == 0 and "2 to encode" in result.stderr, result.stderr[-2000:]
    assert (out / "index.jsonl").read_text() == index_before  # one row per video, no duplicate
    assert (out / "shard-00001.safetensors").read_bytes() == shards["shard-00001.safetensors"][1]
    assert not list(out.glob("shard-00002*"))

    changed = latents_cli(import_root, *args[:-2], "--shard-size", 3, "--stride", 2)
    assert changed.returncode == 1 and "other settings: stride 3 (now 2)" in changed.stderr, changed.stderr[-2000:]


def test_cache_read_rate(cache):
    out, _, _ = cache
    latents = LatentCache(out)
    started, loads = time.perf_counter(), 0
    while time.perf_counter() - started < 1.0:
        for video in latents.videos:
            mean, std = latents.load(video, 0, FRAMES)
            loads += 1
    rate = loads / (time.perf_counter() - started)
    print(f"latent cache read ({FRAMES}x4x{SIZE // 8}x{SIZE // 8} mean+std fp16 -> fp32): {rate:.0f} clips/s")
    assert rate > 10
