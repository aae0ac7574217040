"""The `score` command (train/score.py) on a small folder: a video and a folder of frames with
their reference photos, the real SCRFD detector and a random ArcFace-layout recogniser (CLIP-I,
which needs the full-size CLIP ViT-H/14, is tested in tests/integration/test_train_score_clip.py).
JSON, CSV, summary and plots are written; a second run gives identical files; a re-run resumes."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from id_animator.adapter.errors import TrainingError
from id_animator.train import score
from support.arcface import write_arcface
from support.videos import face_video_frames, write_video

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, scrfd_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("score")
    pack = root / "pack"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    write_arcface(pack / "w600k_r50.onnx")
    astronaut = skimage_data.astronaut()
    rocket = np.asarray(Image.fromarray(skimage_data.rocket()).resize((256, 256)))
    gen = root / "gen"
    gen.mkdir()
    write_video(gen / "astro.mp4", face_video_frames(astronaut, 3, stamp=False) + [rocket])
    frames = gen / "photos"
    frames.mkdir()
    Image.fromarray(astronaut).save(frames / "0000.png")
    Image.fromarray(np.ascontiguousarray(astronaut[:, ::-1])).save(frames / "0001.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(frames / "0002.png")
    refs = root / "refs"
    (refs / "photos").mkdir(parents=True)
    Image.fromarray(astronaut).save(refs / "astro.png")
    Image.fromarray(astronaut).save(refs / "photos" / "a.png")
    (root / "prompts.jsonl").write_text(json.dumps({"id": "astro", "prompt": "an astronaut smiling"}) + "\n")
    return root


def run_score(import_root: Path, folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")
    args = [sys.executable, "-m", "id_animator.train", "score", str(folder / "gen"), "--references",
            str(folder / "refs"), "--pack", str(folder / "pack"), "--prompts", str(folder / "prompts.jsonl"),
            "--provider", "cpu", "--out", str(out), *extra]
    return subprocess.run(args, env=env, cwd=import_root, capture_output=True, text=True, timeout=600)


OUTPUTS = ["scores.json", "frames.csv", "summary.csv", "summary.md", "plots/astro.png", "plots/photos.png"]


def test_scores_files_and_a_second_run_gives_identical_numbers(import_root: Path, folder: Path, tmp_path: Path):
    first = run_score(import_root, folder, tmp_path / "a")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_score(import_root, folder, tmp_path / "b")
    assert second.returncode == 0, second.stderr[-3000:]
    for name in OUTPUTS:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    print(first.stdout)
    assert first.stdout == (tmp_path / "a" / "summary.md").read_text()

    scores = json.loads((tmp_path / "a" / "scores.json").read_text())
    videos = {v["id"]: v for v in scores["videos"]}
    assert sorted(videos) == ["astro", "photos"]
    astro, photos = videos["astro"], videos["photos"]
    assert astro["prompt"] == "an astronaut smiling" and photos["prompt"] is None
    assert [f["frame"] for f in astro["frames"]] == [0, 1, 2, 3]
    assert astro["frames"][3]["face_similarity"] is None and astro["frames"][3]["faces_found"] == 0  # the rocket
    assert all(f["face_similarity"] is not None for f in astro["frames"][:3])
    assert astro["summary"]["face_share"] == 0.75 and astro["summary"]["frames_with_face"] == 3
    assert photos["frames"][0]["face_similarity"] == 1.0  # the reference photo itself
    assert photos["frames"][2]["face_similarity"] is None  # noise: reported, not 0
    assert photos["summary"]["face_similarity"] == round((1.0 + photos["frames"][1]["face_similarity"]) / 2, 6)
    assert all(f["clip_i"] is None for v in videos.values() for f in v["frames"])  # no --image-encoder
    assert scores["summary"]["face_share"] == round((0.75 + round(2 / 3, 6)) / 2, 6)

    with open(tmp_path / "a" / "frames.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 7 and rows[3]["id"] == "astro" and rows[3]["face_similarity"] == ""
    summary = (tmp_path / "a" / "summary.md").read_text()
    assert "| astro | 4 | 3 | 0.7500 |" in summary and "all (mean of videos)" in summary
    plot = Image.open(tmp_path / "a" / "plots" / "astro.png")
    assert plot.size == (768, 320)
    assert np.all(np.asarray(plot.convert("RGB")) == (214, 39, 40), axis=2).any()  # the frame without a face


def test_a_rerun_resumes_and_overwrite_recomputes(import_root: Path, folder: Path, tmp_path: Path):
    assert run_score(import_root, folder, tmp_path).returncode == 0
    record = tmp_path / "videos" / "astro.json"
    stamp = record.stat().st_mtime_ns
    again = run_score(import_root, folder, tmp_path)
    assert again.returncode == 0 and record.stat().st_mtime_ns == stamp
    changed = run_score(import_root, folder, tmp_path, "--frame-face", "most confident")
    assert changed.returncode == 0 and record.stat().st_mtime_ns != stamp  # other settings: scored again
    stamp = record.stat().st_mtime_ns
    assert run_score(import_root, folder, tmp_path, "--frame-face", "most confident", "--overwrite").returncode == 0
    assert record.stat().st_mtime_ns != stamp


def test_missing_reference_and_pack_without_recognition_fail_clearly(import_root: Path, folder: Path,
                                                                     tmp_path: Path, scrfd_dir: Path):
    (folder / "gen" / "other.mp4").symlink_to(folder / "gen" / "astro.mp4")
    try:
        missing = run_score(import_root, folder, tmp_path / "a")
    finally:
        (folder / "gen" / "other.mp4").unlink()
    assert missing.returncode == 1 and "No reference photo for 'other'" in missing.stderr
    assert "Traceback" not in missing.stderr
    detector_only = tmp_path / "scrfd_only"
    detector_only.mkdir()
    (detector_only / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    env = dict(os.environ, PYTHONPATH=str(import_root))
    result = subprocess.run([sys.executable, "-m", "id_animator.train", "score", str(folder / "gen"),
                             "--references", str(folder / "refs" / "astro.png"), "--pack", str(detector_only),
                             "--provider", "cpu", "--out", str(tmp_path / "b")],
                            env=env, cwd=import_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "no face recognition model" in result.stderr


def test_inputs_and_references_are_found(tmp_path: Path):
    (tmp_path / "gen" / "a").mkdir(parents=True)
    (tmp_path / "gen" / "a" / "clip.mp4").write_bytes(b"")
    (tmp_path / "gen" / "frames").mkdir()
    (tmp_path / "gen" / "frames" / "0.png").write_bytes(b"")
    items = score.find_items([tmp_path / "gen"])
    assert [(i.id, i.is_frames) for i in items] == [("a/clip", False), ("frames", True)]
    refs = tmp_path / "refs"
    (refs / "a" / "clip").mkdir(parents=True)
    (refs / "a" / "clip" / "x.jpg").write_bytes(b"")
    (refs / "frames.png").write_bytes(b"")
    assert score.reference_photos(refs, "a/clip") == [refs / "a" / "clip" / "x.jpg"]
    assert score.reference_photos(refs, "frames") == [refs / "frames.png"]
    assert score.reference_photos(refs / "frames.png", "anything") == [refs / "frames.png"]
    with pytest.raises(TrainingError, match="No reference photo for 'b'"):
        score.reference_photos(refs, "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="No videos"):
        score.find_items([tmp_path / "empty"])


def test_clip_geometry_is_shortest_side_then_centre_crop():
    image = np.zeros((300, 600, 3), np.uint8)
    image[:, 225:375] = 255  # a white band in the middle third
    out = score.ClipImage.process(image)
    assert out.shape == (224, 224, 3)
    assert out[112, 112].tolist() == [255, 255, 255] and out[112, 0].tolist() == [0, 0, 0]
