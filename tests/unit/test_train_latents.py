"""The latent cache without the full-size checkpoint: which frames make a clip (synthetic videos
whose frames carry their index), the centre crop and resize against a direct computation, the
VAE posterior through a tiny random AutoencoderKL, shards written and read back, resume after an
interrupted shard, and the command's --help and bad inputs. The command on the generated SD1.5
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
from id_animator.train.latents import (Clip, LatentCache, _ShardWriter, _start_folder, centre_crop_resize,
                                       clip_frames, clip_starts, encode_frames, read_clips, to_pixels)
from support.videos import indexed_frames, read_index, write_video

torch.set_num_threads(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                         latent_channels=4).eval()


def test_clip_starts_cover_the_video_without_overlap_by_default():
    assert clip_starts(40, frames=8, stride=2) == [0, 15]  # span 15: starts 0, 15 (30 + 15 > 40)
    assert clip_starts(44, frames=8, stride=2) == [0, 15]
    assert clip_starts(45, frames=8, stride=2) == [0, 15, 30]
    assert clip_starts(14, frames=8, stride=2) == []  # too short for one clip
    assert clip_starts(16, frames=16, stride=1) == [0]
    assert clip_starts(20, frames=4, stride=1, clip_step=2) == [0, 2, 4, 6, 8, 10, 12, 14, 16]
    assert clip_starts(100, frames=4, stride=1, clips_per_video=3) == [0, 48, 96]  # spread evenly
    assert clip_frames(15, 4, 3) == [15, 18, 21, 24]


def test_read_clips_gives_the_indexed_frames(tmp_path: Path):
    video = write_video(tmp_path / "v.mp4", indexed_frames(37, size=(160, 160)))
    starts = clip_starts(37, frames=5, stride=3, clip_step=7)
    clips = list(read_clips(video, starts, frames=5, stride=3, size=160))  # square and same size: no resampling
    assert [start for start, _ in clips] == starts == [0, 7, 14, 21]
    for start, pixels in clips:
        assert pixels.shape == (5, 160, 160, 3) and pixels.dtype == np.uint8
        assert [read_index(frame) for frame in pixels] == clip_frames(start, 5, 3)


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


def _meta(root: Path) -> None:
    _start_folder(root, {"format": 1, "frames": 3, "stride": 1, "clip_step": 3, "clips_per_video": None, "size": 16,
                         "scaling_factor": 0.18215, "checkpoint": "x.safetensors", "checkpoint_bytes": 1})


def test_shards_round_trip_and_resume_drops_an_interrupted_shard(tmp_path: Path):
    root = tmp_path / "cache"
    _meta(root)
    writer = _ShardWriter(root, shard_size=2)
    stored = {}
    for n, vid in enumerate(["a", "b", "c"]):
        clips = [(s, clip_frames(s, 3, 1), *_fake_clip(10 * n + s)) for s in (0, 3)][: 1 + n % 2]
        stored.update({f"{vid}@{s}": (m, d) for s, _, m, d in clips})
        writer.add_video({"id": vid, "video": f"{vid}.mp4"}, clips)
    writer.videos.append({"id": "short", "video": "short.mp4", "skipped": "too short", "shard": None, "clips": 0})
    writer.flush()
    cache = LatentCache(root)
    assert cache.scaling_factor == 0.18215
    assert [c.name for c in cache.clips] == ["a@0", "b@0", "b@3", "c@0"]
    assert [c.shard for c in cache.clips] == ["shard-00000.safetensors"] * 3 + ["shard-00001.safetensors"]
    assert cache.clips[2] == Clip("b@3", "b", (3, 4, 5), "shard-00000.safetensors", "2")
    for clip in cache.clips:
        mean, std = cache.load(clip)
        assert mean.dtype == torch.float32 and mean.shape == (3, 4, 2, 2)
        assert torch.equal(mean, stored[clip.name][0].half().float())  # fp16 storage, nothing else
        assert torch.equal(std, stored[clip.name][1].half().float())
    sample = cache.sample(cache.clips[0], torch.Generator().manual_seed(0))
    eps = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    mean, std = cache.load(cache.clips[0])
    assert torch.allclose(sample, (mean + std * eps) * 0.18215)

    # an interruption after shard 1 was written and indexed, before its videos were committed
    lines = (root / "videos.jsonl").read_text().splitlines()
    (root / "videos.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # and a line cut short
    assert [c.name for c in LatentCache(root).clips] == ["a@0", "b@0", "b@3"]  # readers ignore it too
    _meta(root)
    index = [json.loads(line) for line in (root / "index.jsonl").read_text().splitlines()]
    assert [row["clip"] for row in index] == ["a@0", "b@0", "b@3"]
    assert _ShardWriter(root, 2).name == "shard-00001.safetensors"  # the orphan shard is rewritten


def test_a_changed_setting_is_refused(tmp_path: Path):
    _meta(tmp_path)
    with pytest.raises(latents.TrainingError, match=r"other settings: size 16 \(now 32\)"):
        _start_folder(tmp_path, {"format": 1, "frames": 3, "stride": 1, "clip_step": 3, "clips_per_video": None,
                                 "size": 32, "scaling_factor": 0.18215, "checkpoint": "x.safetensors",
                                 "checkpoint_bytes": 1})


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
    for flag in ("--checkpoint", "--out", "--frames", "--stride", "--clip-step", "--clips-per-video", "--size",
                 "--batch-size", "--shard-size", "--device", "--dtype"):
        assert flag in result.stdout


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
