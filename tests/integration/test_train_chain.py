"""The whole training chain on CPU, through the real commands, then in real ComfyUI.

Three tiny synthetic videos (a real photo moving a little per frame; one with the Solvay group
photo in every other frame) -> `pool` with the real SCRFD detector -> `captions` from attribute
and action sidecar files -> `latents` with the test bed's full-size random SD1.5 checkpoint's VAE
-> `train` with that checkpoint's UNet, the random AnimateDiff v2 motion module and CLIP ViT-H/14
(the files the nodes load), in bf16 with gradient checkpointing, gradient accumulation and
TensorBoard: the paths a GPU run takes -> the exported `animator.ckpt` and `animator.safetensors`
each loaded by the real LoadIDAnimator, used by FaceEncode and ApplyFaceAdapter to sample.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from id_animator.adapter.checkpoint import load_adapter_checkpoint
from id_animator.train.face_pool import load_pool
from support.graphs import face_video_graph, saved_latent
from support.photos import astronaut_image
from support.videos import face_video_frames, write_video

def cli(import_root: Path, command: str, *args: object) -> subprocess.CompletedProcess:
    # every core: the full-size train step is the one thing running (1 thread: setup 67 s, 2: 60 s)
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "id_animator.train", command, *map(str, args)], env=env,
                            cwd=import_root, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, f"{command} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def chain(import_root: Path, model_files, scrfd_dir: Path, comfyui_dir: Path, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    videos = root / "videos"
    solvay = np.asarray(Image.open(scrfd_dir / "images" / "solvay_conference_1927.jpg").convert("RGB"))
    for number in range(3):
        frames = face_video_frames(astronaut_image(), 24, size=192, seed=number)
        if number == 2:  # every other frame shows a group: those frames never enter the pool
            group = face_video_frames(solvay, 24, size=192, seed=number)
            frames = [group[i] if i % 2 else frame for i, frame in enumerate(frames)]
        write_video(videos / f"person{number}.mp4", frames)
        (videos / f"person{number}.attribute.txt").write_text(f"a woman in an orange suit, number {number}")
        (videos / f"person{number}.action.txt").write_text("she turns her head and smiles.")

    pool, captions, latents, run = root / "pool", root / "captions.jsonl", root / "latents", root / "run"
    # --max-multi-face-share 1: person2 (half group frames) stays, to test the frame-level rejection
    # (the video-level filter would drop it: tests/unit/test_train_face_pool.py)
    cli(import_root, "pool", videos, "--out", pool, "--detector", scrfd_dir / "models" / "scrfd.onnx",
        "--faces-per-video", 3, "--max-multi-face-share", 1)
    cli(import_root, "captions", videos, "--out", captions)
    cli(import_root, "latents", videos, "--checkpoint", model_files["checkpoints"]["sd15_random_full.safetensors"],
        "--out", latents, "--frames", 2, "--stride", 4, "--size", 64, "--device", "cpu")
    cli(import_root, "train",
        "--checkpoint", model_files["checkpoints"]["sd15_random_full.safetensors"],
        "--motion-module", model_files["animatediff_models"]["mm_sd_v15_v2.ckpt"],
        "--image-encoder", model_files["clip_vision"]["CLIP-ViT-H-14-random.safetensors"],
        "--tokenizer", comfyui_dir / "comfy" / "sd1_tokenizer",
        "--latents", latents, "--pool", pool, "--captions", captions, "--out", run,
        "--init", model_files["id_animator"]["animator.ckpt"],
        "--batch-size", 1, "--gradient-accumulation-steps", 2, "--max-steps", 2, "--log-every", 1,
        "--mixed-precision", "bf16", "--gradient-checkpointing", "--report-to", "tensorboard",
        "--dataloader-workers", 0, "--lr", 1e-3)
    return {"pool": pool, "captions": captions, "run": run, "videos": videos}


def test_pool_captions_and_run_folder(chain: dict) -> None:
    pool = load_pool(chain["pool"])
    assert sorted(pool) == ["person0", "person1", "person2"]
    assert all(len(faces) == 3 for faces in pool.values())
    assert all(face.frame % 2 == 0 for face in pool["person2"])  # the group frames (odd) never enter
    rows = [json.loads(line) for line in chain["captions"].read_text().splitlines()]
    assert {row["id"]: row["caption"] for row in rows}["person1"] == \
        "a woman in an orange suit, number 1, she turns her head and smiles"  # the template's cleanup

    losses = [json.loads(line) for line in (chain["run"] / "loss.jsonl").read_text().splitlines()]
    assert [row["step"] for row in losses] == [1, 2]
    assert all(np.isfinite(row["loss"]) and row["loss"] > 0 for row in losses)
    assert (chain["run"] / "loss.png").stat().st_size > 0
    assert any((chain["run"] / "logs").rglob("events.out.tfevents.*"))  # TensorBoard through accelerate


def test_exported_adapter_loads_and_samples_in_comfyui(chain: dict, comfy, comfy_base: Path, model_files) -> None:
    """Both exported files (the official-layout .ckpt and the .safetensors twin) load through the real
    LoadIDAnimator and sample the same video, which is not the starting adapter's."""
    exports = chain["run"] / "exports" / "step-2"
    trained = load_adapter_checkpoint(exports / "animator.ckpt")  # our loader, strict SD1.5 shapes
    start = load_adapter_checkpoint(model_files["id_animator"]["animator.ckpt"])
    moved = [k for k, t in trained.resampler.items() if not torch.equal(t, start.resampler[k])]
    assert len(moved) == len(start.resampler)  # 2 steps at lr 1e-3 moved every Resampler tensor
    assert all(not torch.equal(t, start.layers[31][k]) for k, t in trained.layers[31].items())  # and the layers'
    assert all(t.dtype == torch.float32 and bool(torch.isfinite(t).all()) for t in trained.tensors())

    folder, runs = comfy_base / "models" / "id_animator", {}
    copies = {suffix: folder / f"ida_test_chain{suffix}" for suffix in (".ckpt", ".safetensors")}
    for suffix, target in copies.items():
        shutil.copy(exports / f"animator{suffix}", target)
    comfy.folder_paths.filename_list_cache.clear()
    try:
        for name in [*(path.name for path in copies.values()), "animator.ckpt"]:
            graph = face_video_graph(frames=2, weight=1.0, prefix=f"chain_{name}")
            graph["ida"]["inputs"]["adapter_name"] = name
            result = comfy.run(graph)
            assert result.success, (name, result.error_message)
            runs[name] = saved_latent(comfy_base / "output", result.outputs["save"])
    finally:
        for target in copies.values():
            target.unlink(missing_ok=True)
        comfy.folder_paths.filename_list_cache.clear()
    ckpt, safetensors, before = (runs[name] for name in ("ida_test_chain.ckpt", "ida_test_chain.safetensors",
                                                          "animator.ckpt"))
    assert ckpt.shape == (2, 4, 8, 8) and bool(torch.isfinite(ckpt).all())
    assert torch.equal(ckpt, safetensors)  # the two files hold the same adapter
    assert not torch.equal(ckpt, before)  # and it is the trained one that sampled
