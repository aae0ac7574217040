"""The `score` command's CLIP-I with the full-size CLIP ViT-H/14 clip_vision file of the test bed
(random weights: ComfyUI's layout, loaded by train/sd15.load_image_encoder). A frame equal to the
reference's official 224 crop scores CLIP-I 1; a second run gives identical files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from support.arcface import write_arcface
from support.photos import astronaut_image


def test_clip_i_and_identical_second_run(import_root: Path, model_files, scrfd_dir: Path, tmp_path: Path):
    from id_animator.adapter.face_detection import FaceDetector, detect_and_align

    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    write_arcface(pack / "w600k_r50.onnx")
    astronaut = astronaut_image()
    crop = detect_and_align(FaceDetector(pack), astronaut).crop  # the reference crop CLIP-I compares with
    frames = tmp_path / "gen" / "clip"
    frames.mkdir(parents=True)
    Image.fromarray(crop).save(frames / "0.png")
    Image.fromarray(astronaut).save(frames / "1.png")
    Image.fromarray(astronaut).save(tmp_path / "reference.png")
    encoder = tmp_path / "CLIP-ViT-H-14-random.safetensors"  # the cache's file has no suffix
    encoder.symlink_to(model_files["clip_vision"]["CLIP-ViT-H-14-random.safetensors"])
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")

    def run(*extra: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "id_animator.train", "score", str(tmp_path / "gen"), "--references",
             str(tmp_path / "reference.png"), "--pack", str(pack), "--image-encoder", str(encoder),
             "--provider", "cpu", "--device", "cpu", "--out", str(tmp_path / "out"), *extra],
            env=env, cwd=import_root, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        return (tmp_path / "out" / "scores.json").read_text()

    first = run()
    csv_first = (tmp_path / "out" / "frames.csv").read_bytes()
    video = json.loads(first)["videos"][0]
    clip_i = [f["clip_i"] for f in video["frames"]]
    print(f"CLIP-I (random ViT-H/14): {clip_i}, face similarity {[f['face_similarity'] for f in video['frames']]}")
    assert clip_i[0] == 1.0  # the reference crop itself
    assert -1.0 <= clip_i[1] < 1.0
    assert video["summary"]["clip_i"] == round(float(np.mean(clip_i)), 6)
    assert run("--overwrite") == first
    assert (tmp_path / "out" / "frames.csv").read_bytes() == csv_first
    plot = np.asarray(Image.open(tmp_path / "out" / "plots" / "clip.png").convert("RGB"))
    assert np.all(plot == (255, 127, 14), axis=2).sum() > 20  # the CLIP-I line
