"""The latent cache without the full-size checkpoint: which frames are stored (every stride-th,
each once; synthetic videos whose frames carry their index), the centre crop and resize against a
direct computation, the VAE posterior through a tiny random AutoencoderKL, shards written and
read back (a window reads only its rows), resume after an interrupted shard, the refusal of a
format-1 cache, and the command's --help and bad inputs. The command on the generated SD1.5
checkpoint is tests/integration/test_train_latents.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from id_animator.train import latents
from id_animator.train.latents import (CachedVideo, LatentCache, _ShardWriter, _start_folder, centre_crop_resize,
                                       clip_frames, encode_frames, read_stored, stored_frames, to_pixels)
from support.videos import indexed_frames, read_index, write_video

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4).eval()


def test_every_stride_th_frame_is_stored_once():
    assert stored_frames(40, 4) == list(range(0, 40, 4))  # 10 frames: 7 overlapping 4-frame windows
    assert stored_frames(3, 4) == [0]
    assert clip_frames(15, 4, 3) == [15, 18, 21, 24]
    video = CachedVideo("v", tuple(stored_frames(40, 4)), "shard-00000.safetensors", "0")
    assert video.windows(4) == 7 and video.windows(10) == 1 and video.windows(11) == 0


def test_read_stored_gives_the_indexed_frames_in_chunks(tmp_path: Path):
    video = write_video(tmp_path / "v.mp4", indexed_frames(37, size=(160, 160)))
    frames = stored_frames(37, 3)
    pieces = list(read_stored(video, frames, size=160, chunk=5))  # square and same size: no resampling
    assert [len(piece) for piece in pieces] == [5, 5, 3]
    assert all(piece.shape[1:] == (160, 160, 3) and piece.dtype == np.uint8 for piece in pieces)
    assert [read_index(frame) for piece in pieces for frame in piece] == frames
    with pytest.raises(latents.TrainingError, match="ended before frame 39"):
        list(read_stored(video, [*frames, 39], size=160, chunk=5))


def test_centre_crop_resize_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    wide = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)
    direct = np.asarray(Image.fromarray(wide).crop((16, 0, 64, 48)).resize((32, 32), Image.BICUBIC))
    assert np.array_equal(centre_crop_resize(wide, 32), direct)
    tall = rng.integers(0, 256, (90, 40, 3), dtype=np.uint8)
    assert np.array_equal(centre_crop_resize(tall, 40), tall[25:65])  # no resize when the side fits
    marked = np.zeros((64, 128, 3), np.uint8)
    marked[28:36, 60:68] = 255  # a block at the centre stays at the centre
    out = centre_crop_resize(marked, 32)
    assert out[14:18, 14:18].min() > 200 and out[:8].max() < 30 and out[:, :8].max() < 30


def test_encode_frames_is_the_vae_posterior_and_deterministic(tiny_vae):
    frames = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mean, std = encode_frames(tiny_vae, frames, batch_size=2)  # three batches: 2, 2, 1
    with torch.no_grad():
        posterior = tiny_vae.encode(to_pixels(frames)).latent_dist
    assert mean.shape == std.shape == (5, 4, 16, 16)
    assert rel_err(mean, posterior.mean) <= 1e-5 and rel_err(std, posterior.std) <= 1e-5
    again = encode_frames(tiny_vae, frames, batch_size=5)
    assert rel_err(again[0], mean) <= 1e-5 and rel_err(again[1], std) <= 1e-5
    assert to_pixels(np.array([[[[0, 255, 128]]]], np.uint8)).flatten().tolist() == pytest.approx([-1, 1, 0.00392], abs=1e-4)


def _fake_clip(seed: int, frames: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 4, 2, 2, generator=gen), torch.rand(frames, 4, 2, 2, generator=gen) + 0.1


SETTINGS = {"format": 2, "frames": 3, "stride": 1, "size": 16, "scaling_factor": 0.18215,
            "checkpoint": "x.safetensors", "checkpoint_bytes": 1}


def _meta(root: Path) -> None:
    _start_folder(root, dict(SETTINGS))


def test_shards_round_trip_and_resume_drops_an_interrupted_shard(tmp_path: Path):
    root = tmp_path / "cache"
    _meta(root)
    writer = _ShardWriter(root, shard_size=8)  # stored frames per shard
    stored = {}
    for n, vid in enumerate(["a", "b", "c"]):
        count = (5, 4, 6)[n]
        mean, std = _fake_clip(n, frames=count)
        stored[vid] = (mean, std)
        writer.add_video({"id": vid, "video": f"{vid}.mp4"}, list(range(count)), mean, std)
    writer.videos.append({"id": "short", "video": "short.mp4", "skipped": "too short", "shard": None, "stored": 0})
    writer.flush()
    cache = LatentCache(root)
    assert cache.scaling_factor == 0.18215 and cache.window == 3
    assert [v.video_id for v in cache.videos] == ["a", "b", "c"]
    assert [v.shard for v in cache.videos] == ["shard-00000.safetensors"] * 2 + ["shard-00001.safetensors"]
    assert cache.videos[1] == CachedVideo("b", (0, 1, 2, 3), "shard-00000.safetensors", "1")
    for video in cache.videos:
        mean, std = cache.load(video)
        assert mean.dtype == torch.float32 and mean.shape == (len(video.frames), 4, 2, 2)
        assert torch.equal(mean, stored[video.video_id][0].half().float())  # fp16 storage, nothing else
        assert torch.equal(std, stored[video.video_id][1].half().float())
        window = cache.load(video, 1, 3)  # a window reads its rows only
        assert torch.equal(window[0], mean[1:4]) and torch.equal(window[1], std[1:4])
    sample = cache.sample(cache.videos[0], 2, torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    mean, std = cache.load(cache.videos[0], 2, 3)
    assert torch.allclose(sample, (mean + std * eps) * 0.18215)
    with pytest.raises(latents.TrainingError, match="outside the 5 stored frames of a"):
        cache.load(cache.videos[0], 3, 3)

    # an interruption after shard 1 was written and indexed, before its videos were committed
    lines = (root / "videos.jsonl").read_text().splitlines()
    (root / "videos.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # and a line cut short
    assert [v.video_id for v in LatentCache(root).videos] == ["a", "b"]  # readers ignore it too
    _meta(root)
    index = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    assert [row["id"] for row in index] == ["a", "b"]
    assert _ShardWriter(root, 8).name == "shard-00001.safetensors"  # the orphan shard is rewritten


def test_a_changed_setting_and_a_format_1_cache_are_refused(tmp_path: Path):
    _meta(tmp_path)
    with pytest.raises(latents.TrainingError, match=r"other settings: size 16 \(now 32\)"):
        _start_folder(tmp_path, {**SETTINGS, "size": 32})
    old = tmp_path / "old"
    old.mkdir()
    (old / "meta.json").write_text(json.dumps({**SETTINGS, "format": 1, "clip_step": 3}))
    for action in (lambda: _start_folder(old, dict(SETTINGS)), lambda: LatentCache(old)):
        with pytest.raises(latents.TrainingError, match=r"format 1 \(fixed clips\).*--out NEW_FOLDER"):
            action()


def test_not_a_cache_says_how_to_make_one(tmp_path: Path):
    with pytest.raises(latents.TrainingError, match="latents VIDEOS --checkpoint"):
        LatentCache(tmp_path)


def _cli(import_root: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "id_animator.train", "latents", *args], env=env, cwd=import_root,
                          capture_output=True, text=True, timeout=300)


def test_cli_help_names_every_flag(import_root: Path):
    result = _cli(import_root, "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--checkpoint", "--out", "--frames", "--stride", "--size", "--batch-size", "--shard-size",
                 "--device", "--dtype"):
        assert flag in result.stdout
    assert "--clip-step" not in result.stdout  # windows are drawn by the trainer


@pytest.mark.parametrize("args, message", [
    (["--checkpoint", "{tmp}/missing.safetensors"], "does not exist"),
    (["--checkpoint", "{tmp}/x.safetensors", "--size", "100"], "multiple of 8"),
    (["--checkpoint", "{tmp}/x.safetensors", "--frames", "0"], "--frames must be at least 1"),
])
def test_cli_bad_inputs_fail_with_a_message(import_root: Path, tmp_path: Path, args: list[str], message: str):
    (tmp_path / "x.safetensors").write_bytes(b"x")
    (tmp_path / "videos").mkdir()
    result = _cli(import_root, str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
                  *[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_cli_no_videos_and_a_wrong_checkpoint(import_root: Path, tmp_path: Path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "x.safetensors").write_bytes(b"junk")
    result = _cli(import_root, str(tmp_path / "videos"), "--checkpoint", str(tmp_path / "x.safetensors"),
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "No videos found" in result.stderr, result.stderr
    write_video(tmp_path / "videos" / "v.mp4", indexed_frames(4, size=(32, 32)))
    result = _cli(import_root, str(tmp_path / "videos"), "--checkpoint", str(tmp_path / "x.safetensors"),
                  "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "neither a safetensors file nor a PyTorch checkpoint" in result.stderr and "x.safetensors" in result.stderr, result.stderr


def test_the_command_loop_encodes_every_stride_th_frame_once(tiny_vae, tmp_path: Path):
    """`encode_videos` (the command after loading the VAE) on indexed videos with the tiny VAE:
    one row per video listing every 3rd frame, its stored posterior equal to the VAE on those
    frames (one fp16 rounding), a too-short video skipped, a rerun encoding nothing."""
    import argparse

    from id_animator.train.video import find_videos, read_frames

    folder = tmp_path / "videos"
    write_video(folder / "a.mp4", indexed_frames(20, size=(32, 160), seed=1))
    write_video(folder / "short.mp4", indexed_frames(5, size=(32, 32), seed=2))
    args = argparse.Namespace(frames=3, stride=3, size=32, batch_size=4, shard_size=64)
    root = tmp_path / "cache"
    _start_folder(root, {**SETTINGS, "frames": 3, "stride": 3, "size": 32})
    videos = find_videos([folder])
    latents.encode_videos(tiny_vae, videos, root, args)
    cache = LatentCache(root)
    (video,) = cache.videos
    assert video.video_id == "a" and video.frames == tuple(range(0, 20, 3)) == tuple(stored_frames(20, 3))
    decoded = [frame for _, frame in read_frames(folder / "a.mp4", video.frames)]
    assert [read_index(frame) for frame in decoded] == list(video.frames)
    pixels = np.stack([centre_crop_resize(frame, 32) for frame in decoded])
    with torch.no_grad():
        posterior = tiny_vae.encode(to_pixels(pixels)).latent_dist
    mean, std = cache.load(video)
    assert torch.equal(mean, posterior.mean.half().float()) or rel_err(mean, posterior.mean) <= 1e-3
    assert rel_err(std, posterior.std) <= 1e-3
    rows = {json.loads(line)["id"]: json.loads(line) for line in (root / "videos.jsonl").read_text().splitlines()}
    assert rows["short"]["skipped"].startswith("too short: 5 frames") and rows["a"]["stored"] == 7
    before = (root / "index.jsonl").read_text()
    latents.encode_videos(tiny_vae, videos, root, args)  # everything finished: nothing encoded again
    assert (root / "index.jsonl").read_text() == before
