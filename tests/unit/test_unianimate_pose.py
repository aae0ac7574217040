"""UniAnimate pose (unianimate/pose) against the official code at 643c963: DWPose detection and
keypoints on the same random-weight ONNX files and images, run_align_pose's alignment on the same
keypoints, and its drawing, compared exactly (the arrays before JPEG)."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from id_animator.adapter.errors import PoseError
from id_animator.unianimate.pose import align, detector, draw, keypoints, video
from id_animator.unianimate.pose.dwpose import DWPoseModel
from id_animator.unianimate.pose.keypoints import PoseKeypoints
from support.dwpose_models import dwpose_files
from support.unianimate_pose_official import official_pose, run_official

CPU = ["CPUExecutionProvider"]
SIZES = [(480, 360), (300, 500), (640, 640), (257, 903)]  # (h, w): tall, wide, square, odd
SKELETON = np.array([  # OpenPose-18 + the two feet, normalised (x, y), a person facing the camera
    (0.50, 0.15), (0.50, 0.25), (0.40, 0.25), (0.37, 0.38), (0.35, 0.50), (0.60, 0.25), (0.63, 0.38),
    (0.65, 0.50), (0.45, 0.55), (0.44, 0.70), (0.44, 0.85), (0.55, 0.55), (0.56, 0.70), (0.56, 0.85),
    (0.48, 0.13), (0.52, 0.13), (0.46, 0.14), (0.54, 0.14), (0.58, 0.90), (0.42, 0.90)])


def blocks_image(height: int, width: int, seed: int) -> np.ndarray:
    """BGR uint8: coloured rectangles on a dark ground (what the random detector responds to)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, np.uint8)
    for _ in range(14):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:y + rng.integers(20, 220), x:x + rng.integers(20, 220)] = rng.integers(0, 256, 3)
    return image


def person(seed: int, scale: tuple[float, float] = (1.0, 1.0), missing: tuple[int, ...] = (),
           missing_hand_points: int = 3) -> PoseKeypoints:
    """A plausible pose: the skeleton scaled about the neck, jittered; `missing` body points and a
    few hand points are (-1, -1) as the official selection leaves them."""
    rng = np.random.default_rng(seed)
    body = (SKELETON - SKELETON[1]) * np.array(scale) + SKELETON[1] + rng.normal(0, 0.005, SKELETON.shape)
    visible = np.ones(20, bool)
    visible[list(missing)] = False
    body[list(missing)] = -1.0
    hands = np.stack([body[7] + rng.normal(0, 0.03, (21, 2)), body[4] + rng.normal(0, 0.03, (21, 2))])
    hands[0, rng.choice(21, missing_hand_points, replace=False)] = -1.0
    face = body[0] + rng.normal(0, 0.02, (68, 2))
    return PoseKeypoints(body, visible, hands, face)


def as_official(pose: PoseKeypoints) -> dict:
    """Our keypoints in the official DWposeDetector's pose dict."""
    subset = np.where(pose.body_visible, np.arange(20), -1).astype(np.float64)[None]
    return dict(bodies=dict(candidate=pose.body.copy(), subset=subset), hands=pose.hands.copy(),
                faces=pose.face[None].copy())


@pytest.fixture(scope="module")
def official(cache_dir):
    return official_pose(cache_dir)


@pytest.fixture(scope="module")
def onnx_files(cache_dir) -> dict[str, Path]:
    return dwpose_files(cache_dir)


@pytest.fixture(scope="module")
def model(onnx_files) -> DWPoseModel:
    return DWPoseModel(onnx_files["yolox_l.onnx"], onnx_files["dw-ll_ucoco_384.onnx"], CPU)


@pytest.fixture
def checkpoints(tmp_path, onnx_files) -> Path:
    """A working directory with checkpoints/<the two files>, where the official Wholebody looks."""
    (tmp_path / "checkpoints").mkdir()
    for name, path in onnx_files.items():
        (tmp_path / "checkpoints" / name).symlink_to(path)
    return tmp_path


def test_detector_boxes_equal_official(official, model):
    counts = []
    for seed, (height, width) in enumerate(SIZES):
        image = blocks_image(height, width, 10 + seed)
        ours = detector.detect_people(model.detector, image)
        theirs = official["onnxdet"].inference_detector(model.detector, image)
        assert ours.shape == theirs.shape and np.array_equal(ours, theirs), (height, width)
        counts.append(len(ours))
    assert min(counts) >= 2 and len(set(map(tuple, np.round(ours[:3])))) == 3  # real NMS work, distinct boxes


def test_keypoints_equal_official_wholebody(official, model, checkpoints, monkeypatch):
    monkeypatch.chdir(checkpoints)
    wholebody = official["wholebody"].Wholebody()  # asks for CUDA; onnxruntime falls back to CPU here
    scores_seen = []
    for seed, (height, width) in enumerate(SIZES):
        image = blocks_image(height, width, 30 + seed)
        their_points, their_scores = wholebody(image)
        boxes = detector.detect_people(model.detector, image)
        points, scores = keypoints.to_openpose(*keypoints.estimate_wholebody(model.pose_model, image, boxes[0]))
        np.testing.assert_array_equal(points, their_points[0])
        np.testing.assert_array_equal(scores, their_scores[0])
        scores_seen.append(scores)
    scores = np.concatenate(scores_seen)
    assert (scores > 0.3).mean() > 0.2 and (scores <= 0).mean() > 0.05  # visible, weak and absent points


def test_whole_image_fallback_equals_official(official, model, checkpoints, monkeypatch):
    """With no person box the official estimates on the whole image: so does whole_image_fallback."""
    monkeypatch.chdir(checkpoints)
    wholebody = official["wholebody"].Wholebody()
    for value in range(0, 256, 15):
        empty = np.full((640, 640, 3), value, np.uint8)
        if len(detector.detect_people(model.detector, empty)) == 0:
            break
    else:
        pytest.fail("the random detector finds a box in every flat image: change DETECTOR_SEED")
    assert model(empty).pose is None
    found = model(empty, whole_image_fallback=True)
    their_points, their_scores = wholebody(empty)
    assert found.whole_image
    ours = keypoints.to_openpose(*keypoints.estimate_wholebody(model.pose_model, empty, None))
    np.testing.assert_array_equal(ours[0], their_points[0])
    np.testing.assert_array_equal(ours[1], their_scores[0])


def test_selection_equals_official_dwpose_detector(official, model, checkpoints, monkeypatch):
    monkeypatch.chdir(checkpoints)
    detector_official = official["run_align_pose"].DWposeDetector()
    for seed, (height, width) in enumerate(SIZES):
        image = blocks_image(height, width, 10 + seed)
        theirs, ours = detector_official(image), model(image).pose
        np.testing.assert_array_equal(ours.body, theirs["bodies"]["candidate"])
        np.testing.assert_array_equal(np.where(ours.body_visible, np.arange(20), -1), theirs["bodies"]["subset"][0])
        np.testing.assert_array_equal(ours.hands, theirs["hands"])
        np.testing.assert_array_equal(ours.face, theirs["faces"][0])


def test_drawing_equals_official(official):
    """Bit for bit, before JPEG: limbs, dim, joints, hands; points off the canvas and missing ones."""
    for seed in range(12):
        pose = person(seed, missing=(16, 19) if seed % 3 == 0 else (), missing_hand_points=seed % 5)
        if seed % 4 == 1:
            pose.hands[1] += 0.35  # part of a hand off the canvas
        theirs, _ = official["run_align_pose"].draw_pose(as_official(pose), H=768, W=512)
        ours = draw.draw_pose(pose)
        assert ours.dtype == np.uint8 and ours.shape == (768, 512, 3)
        assert np.array_equal(ours, theirs), f"seed {seed}: {np.count_nonzero(ours != theirs)} values differ"
        packed = ours.astype(np.int32) @ np.array([1 << 16, 1 << 8, 1], np.int32)
        assert len(np.unique(packed)) > 20  # limbs, joints and hand colours drawn


def test_pose_image_is_what_the_official_inference_reads(official, tmp_path):
    """The official writes the canvas with cv2.imwrite (BGR) and reads it with PIL (RGB): our
    IMAGE (model_view) is that array; only JPEG loss is left."""
    canvas = draw.draw_pose(person(3))
    path = tmp_path / "0000.jpg"
    cv2.imwrite(str(path), canvas)
    read_back = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    to_ours = np.abs(read_back - draw.model_view(canvas)).mean()
    to_unswapped = np.abs(read_back - canvas).mean()
    assert to_ours < 2.0 and to_unswapped > 4 * to_ours, (to_ours, to_unswapped)


def _aligned_by_official(cache_dir, tmp_path, monkeypatch, reference, frames):
    given = [as_official(p) for p in frames] + [as_official(reference)]  # the script reads the video first
    calls = iter(given)
    run = run_official(cache_dir, tmp_path, [np.zeros((8, 8, 3), np.uint8)] * len(frames),
                       np.zeros((8, 8, 3), np.uint8), monkeypatch,
                       detector=lambda: (lambda image: next(calls)))
    return run, given[:-1]  # the script aligned these dicts in place


@pytest.mark.parametrize("missing", [(), (16, 19)], ids=["all points", "an ear and a foot missing"])
def test_alignment_equals_official(official, cache_dir, tmp_path, monkeypatch, missing):
    reference = person(100, scale=(0.8, 1.25))
    frames = [person(101, scale=(1.1, 0.9), missing=missing)] + [person(102 + i, scale=(1.1, 0.9)) for i in range(4)]
    run, aligned_official = _aligned_by_official(cache_dir, tmp_path, monkeypatch, reference, frames)
    aligned, alignment = align.align_poses(reference, frames, keep_missing_bones=False)
    for ours, theirs, canvas in zip(aligned, aligned_official, run.frames):
        np.testing.assert_allclose(ours.body, theirs["bodies"]["candidate"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ours.hands, theirs["hands"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(ours.face, theirs["faces"][0], rtol=1e-12, atol=1e-15)
        assert np.array_equal(draw.draw_pose(ours), canvas)
    assert np.array_equal(draw.draw_pose(reference), run.reference)  # the reference pose, unaligned
    assert abs(alignment.x_ratio - 0.8 / 1.1) < 0.1 and abs(alignment.y_ratio - 1.25 / 0.9) < 0.2
    moved = np.abs(aligned[2].body - frames[2].body).max()
    assert moved > 0.02  # the alignment changed the poses (the test would see a no-op)


def test_missing_bones_kept_differs_from_official_only_there(cache_dir, tmp_path, monkeypatch):
    """The pack's default keeps a bone with a missing end at its length; the rest is official."""
    reference = person(100, scale=(0.8, 1.25))
    frames = [person(101, missing=(16,))] + [person(102 + i) for i in range(3)]
    exact, _ = align.align_poses(reference, frames, keep_missing_bones=False)
    kept, alignment = align.align_poses(reference, frames, keep_missing_bones=True)
    assert alignment.kept_bones == ["14-16"]
    differs = np.abs(exact[1].body - kept[1].body).max(axis=1) > 1e-12
    assert list(np.flatnonzero(differs)) == [16]


def test_pose_video_equals_official_run_align_pose(official, model, cache_dir, checkpoints, monkeypatch):
    """The whole official script (DWposeDetector on the same ONNX files, alignment, drawing) against
    pose_video in its official modes."""
    reference = blocks_image(480, 360, 30)
    frames = [blocks_image(480, 360, 31 + i) for i in range(4)]
    run = run_official(cache_dir, checkpoints, frames, reference, monkeypatch)
    ours = video.pose_video(model, reference, frames, align="official (exact)",
                            missing_person="whole image (official)")
    assert np.array_equal(ours.reference_canvas, run.reference)
    for index, (canvas, theirs) in enumerate(zip(ours.frame_canvases, run.frames)):
        assert np.array_equal(canvas, theirs), f"frame {index}: {np.count_nonzero(canvas != theirs)} values differ"
    assert ours.frame_canvases.reshape(len(frames), -1).std(axis=0).max() > 0  # the frames differ


def test_swapped_onnx_files_are_named(onnx_files):
    with pytest.raises(PoseError, match="swap the two files"):
        DWPoseModel(onnx_files["dw-ll_ucoco_384.onnx"], onnx_files["yolox_l.onnx"], CPU)


def test_missing_and_damaged_files(onnx_files, tmp_path):
    with pytest.raises(PoseError, match="does not exist.*models/dwpose/"):
        DWPoseModel(tmp_path / "yolox_l.onnx", onnx_files["dw-ll_ucoco_384.onnx"], CPU)
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(onnx_files["yolox_l.onnx"].read_bytes()[:5000])
    with pytest.raises(PoseError, match="damaged or truncated"):
        DWPoseModel(cut, onnx_files["dw-ll_ucoco_384.onnx"], CPU)


def test_no_person_in_reference_or_first_frame(model):
    flat = next(np.full((640, 640, 3), v, np.uint8) for v in range(0, 256, 15)
                if len(detector.detect_people(model.detector, np.full((640, 640, 3), v, np.uint8))) == 0)
    someone = blocks_image(480, 360, 31)
    with pytest.raises(PoseError, match="No person was found in the reference image"):
        video.pose_video(model, flat, [someone])
    with pytest.raises(PoseError, match="first driving frame"):
        video.pose_video(model, someone, [flat, someone])
    with pytest.raises(PoseError, match="driving frame 1"):
        video.pose_video(model, someone, [someone, flat], missing_person="error")
    result = video.pose_video(model, someone, [someone, flat, someone], align="none")
    assert result.empty_frames == [1] and not result.frame_canvases[1].any() and result.frame_canvases[2].any()
    assert any("1 of 3 driving frames" in w for w in result.warnings)
    sliver = video.pose_video(model, someone, [someone, np.zeros((1, 2000, 3), np.uint8)], align="none")
    assert sliver.empty_frames == [1]  # letterboxed to 0 rows: no person, not a cv2 error

