"""The face pool (paper §3.3.2) with the real SCRFD detector on videos made of real photos.

The astronaut photo holds one face, the Solvay conference photo 29: frames made of the first must
enter a pool, frames made of the second never. Every frame carries its index (support/videos.py),
so a crop can be traced to the frame it came from. The frame-level tests pool with the video-level
filter off (KEEP_ALL), so a video mixing both kinds of frames keeps its single-face frames; the
filter itself is tested on a two-person video with some single-face frames.
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

from id_animator.adapter.errors import TrainingError
from id_animator.adapter.face_detection import FaceDetector, detect_and_align, resolve_providers
from id_animator.train import cli
from id_animator.train.face_pool import (
    MAX_MULTI_FACE_SHARE, PoolFace, PoolSettings, dropped_videos, load_pool, multi_face_share, parse_shard,
    pool_video, read_record, select_shard, video_seed, _FrameKeys,
)
from id_animator.train.video import Video, read_frames
from support.videos import face_video_frames, indexed_frames, read_index, write_video

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning"),
              pytest.mark.usefixtures("one_torch_thread")]


def shuffled_order(seed: int, frames: int) -> list[int]:
    """The frame order a video with this seed is walked in: frames sorted by their seeded keys."""
    keys = _FrameKeys(seed)
    return sorted(range(frames), key=lambda i: (keys[i], i))


SIZE = 256
KEEP_ALL = ("--max-multi-face-share", "1")  # the video-level filter off: frame-level behaviour alone
PAIR_FRAMES, PAIR_SINGLE = 16, (1, 6, 11, 14)  # pair.mp4: two people except in these frames
MIXED_FACE_FRAMES = (2, 7, 13)  # astronaut frames of mixed.mp4; the other 13 are Solvay
MIXED_FRAMES = 16


@pytest.fixture(scope="module")
def scrfd_onnx(scrfd_dir: Path) -> Path:
    return scrfd_dir / "models" / "scrfd.onnx"


@pytest.fixture(scope="module")
def detector(scrfd_onnx: Path) -> FaceDetector:
    """The oracle's detector: built as the nodes build it, not through the pool's loader."""
    return FaceDetector(scrfd_onnx, providers=resolve_providers("CPU"))


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory, scrfd_dir: Path) -> Path:
    """astro/a1 (12 astronaut frames), astro/a2 (3), mixed (astronaut at MIXED_FACE_FRAMES, Solvay
    elsewhere), solvay (6 Solvay frames), blank (4 frames without a face)."""
    folder = tmp_path_factory.mktemp("videos")
    astronaut = skimage_data.astronaut()
    solvay = np.ascontiguousarray(cv2.imread(str(scrfd_dir / "images" / "solvay_conference_1927.jpg"))[:, :, ::-1])
    face = face_video_frames(astronaut, MIXED_FRAMES, size=SIZE, stamp=False, seed=1)
    group = face_video_frames(solvay, MIXED_FRAMES, size=SIZE, stamp=False, seed=2)
    from support.videos import stamp_index

    def stamped(frames):
        return [stamp_index(frame, i) for i, frame in enumerate(frames)]

    write_video(folder / "astro" / "a1.mp4", stamped(face[:12]))
    write_video(folder / "astro" / "a2.mp4", stamped(face[:3]))
    write_video(folder / "mixed.mp4", stamped([face[i] if i in MIXED_FACE_FRAMES else group[i]
                                               for i in range(MIXED_FRAMES)]))
    write_video(folder / "solvay.mp4", stamped(group[:6]))
    write_video(folder / "blank.mp4", indexed_frames(4, size=(64, 192)))
    return folder


def _pool_cli(*args: str | Path) -> int:
    return cli.main(["pool", *map(str, args), *KEEP_ALL])


@pytest.fixture(scope="module")
def pool(videos: Path, scrfd_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    assert _pool_cli(videos, "--out", out, "--detector", scrfd_onnx, "--provider", "cpu") == 0
    return out


def _records(pool_dir: Path) -> dict[str, dict]:
    return {p.relative_to(pool_dir / "videos").with_suffix("").as_posix(): json.loads(p.read_text())
            for p in (pool_dir / "videos").rglob("*.json")}


def _frame(video: Path, index: int) -> np.ndarray:
    (found, rgb), = read_frames(video, indices=[index])
    assert found == index
    return rgb


# ----------------------------------------------------------------------------- content

def test_single_face_frames_enter_the_pool_group_frames_never(pool: Path) -> None:
    loaded = load_pool(pool)
    assert sorted(loaded) == ["astro/a1", "astro/a2", "mixed"]
    assert len(loaded["astro/a1"]) == 5  # min(5, 12 face frames)
    assert len(loaded["astro/a2"]) == 3  # min(5, 3)
    assert sorted(face.frame for face in loaded["mixed"]) == list(MIXED_FACE_FRAMES)  # no Solvay frame
    assert all(isinstance(face, PoolFace) and face.crop.is_file() for faces in loaded.values() for face in faces)
    records = _records(pool)
    assert records["mixed"]["rejected"] == {"no_face": 0, "several_faces": MIXED_FRAMES - len(MIXED_FACE_FRAMES)}
    assert records["astro/a1"]["frames"] == 12 and records["mixed"]["frames"] == MIXED_FRAMES
    assert records["blank"]["rejected"] == {"no_face": 4, "several_faces": 0}


def test_videos_without_a_single_face_frame_are_dropped_and_listed(pool: Path) -> None:
    dropped = dropped_videos(pool)
    assert sorted(dropped) == ["blank", "solvay"]
    assert "6 with several" in dropped["solvay"] and "4 without a face" in dropped["blank"]
    assert _records(pool)["solvay"]["faces"] == [] and not (pool / "crops" / "solvay").exists()
    lines = (pool / "dropped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["blank", "solvay"]


def test_crops_are_the_inference_crop_of_the_decoded_frame(pool: Path, videos: Path,
                                                           detector: FaceDetector) -> None:
    """Each crop is FaceEncode's: `detect_and_align` (the node's function: 320 first, its face
    selection) on the decoded frame; the frame was counted as one face at --det-size 640.
    (The test bed's SCRFD export has a fixed 640x640 input, so here both detections run at 640;
    the next test runs them at their own sizes.)"""
    checked = 0
    for video_id, faces in load_pool(pool).items():
        for face in faces:
            rgb = _frame(videos / f"{video_id}.mp4", face.frame)
            assert read_index(rgb) == face.frame  # the record names the frame the crop came from
            assert len(detector.detect(rgb, 640)) == 1
            expected = detect_and_align(detector, rgb)
            crop = np.asarray(Image.open(face.crop).convert("RGB"))
            assert crop.shape == (224, 224, 3)
            np.testing.assert_array_equal(crop, expected.crop)
            np.testing.assert_allclose(face.box, expected.face.bbox, atol=1e-3)
            checked += 1
    assert checked == 5 + 3 + 3


@pytest.fixture(scope="module")
def any_size_scrfd(scrfd_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test bed's SCRFD with its input size left open, so that 320 and 640 really differ (the
    export is fixed at 640x640). Its only size-bound nodes are the two FPN upsamplings, which
    resize to fixed sizes (40x40, 80x80 at 640); given as scale 2 instead and with the input's
    height and width symbolic, it is the same network at 640 and runs at any multiple of 32."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(scrfd_onnx))
    graph = model.graph
    resizes = [n for n in graph.node if n.op_type == "Resize"]
    assert len(resizes) == 2
    graph.initializer.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "fpn_scale_2"))
    for node in resizes:  # inputs: X, roi, scales, sizes
        node.input[:] = [node.input[0], node.input[1], "fpn_scale_2"]
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for output in graph.output:  # anchors per level follow the size
        output.type.tensor_type.shape.dim[1].dim_param = "anchors"
    del graph.value_info[:]  # shapes inferred at 640
    path = tmp_path_factory.mktemp("scrfd_any_size") / "scrfd.onnx"
    onnx.save(model, str(path))
    return path


def test_pool_crops_are_the_inference_crop_where_320_and_640_differ(
        any_size_scrfd: Path, detector: FaceDetector, tmp_path: Path) -> None:
    """On a frame where detecting at 320 and at 640 give different crops, the pool's crop is
    FaceEncode's (320 first), not the counting size's (--det-size 640)."""
    any_size = FaceDetector(any_size_scrfd, providers=resolve_providers("CPU"))
    assert any_size.input_size(320) == (320, 320) and detector.input_size(320) == (640, 640)
    frames = face_video_frames(skimage_data.astronaut(), 3, size=SIZE, seed=6)
    # the rewrite is faithful: at 640 it finds what the fixed export finds
    fixed, rewritten = detector.detect(frames[0], 640), any_size.detect(frames[0], 640)
    assert len(fixed) == len(rewritten) == 1
    np.testing.assert_allclose(rewritten[0].kps, fixed[0].kps, atol=1e-3)

    video = write_video(tmp_path / "videos" / "astro.mp4", frames)
    out = tmp_path / "pool"
    assert _pool_cli(video.parent, "--out", out, "--detector", any_size_scrfd, "--provider", "cpu",
                     "--det-size", "640") == 0
    faces = load_pool(out)["astro"]
    assert len(faces) == 3
    differ = 0
    for face in faces:
        rgb = _frame(video, face.frame)
        at_320 = detect_and_align(any_size, rgb)
        at_640 = detect_and_align(any_size, rgb, det_sizes=(640,))
        assert len(any_size.detect(rgb, 320)) == 1  # found at the official size: 320 made the crop
        crop = np.asarray(Image.open(face.crop).convert("RGB"))
        np.testing.assert_array_equal(crop, at_320.crop)
        gap = float(np.abs(at_320.face.kps - at_640.face.kps).max())
        pixels = int((at_320.crop.astype(int) != at_640.crop.astype(int)).any(-1).sum())
        print(f"frame {face.frame}: keypoints 320 vs 640 up to {gap:.2f} px apart, crops differ in {pixels} pixels")
        differ += pixels > 1000
    assert differ == len(faces)


@pytest.fixture(scope="module")
def pair_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pair.mp4: 16 frames of two people side by side (the astronaut and her mirror image, 512x256);
    in the frames PAIR_SINGLE the right one is replaced by a faceless background."""
    astronaut = skimage_data.astronaut()
    left = face_video_frames(astronaut, PAIR_FRAMES, size=SIZE, stamp=False, seed=3)
    right = face_video_frames(astronaut[:, ::-1], PAIR_FRAMES, size=SIZE, stamp=False, seed=4)
    empty = indexed_frames(1, size=(SIZE, SIZE), seed=5)[0]
    from support.videos import stamp_index

    frames = [stamp_index(np.concatenate([left[i], empty if i in PAIR_SINGLE else right[i]], axis=1), i)
              for i in range(PAIR_FRAMES)]
    return write_video(tmp_path_factory.mktemp("pair") / "pair.mp4", frames)


def test_videos_of_several_people_are_dropped_with_their_counts(pair_video: Path, videos: Path,
                                                                 detector: FaceDetector, tmp_path: Path) -> None:
    """Paper §4.1: a two-person video is dropped although 4 of its frames show one face; the
    record keeps the counts. Without the filter the same walk keeps those 4 frames."""
    decisions = {}
    for name, path in (("pair", pair_video), ("mixed", videos / "mixed.mp4"), ("astro/a1", videos / "astro" / "a1.mp4")):
        record = pool_video(Video(path, name), detector, tmp_path / "filtered", PoolSettings())
        decisions[name] = record
        print(f"{name}: tried {record['tried']}, rejected {record['rejected']}, multi-face share "
              f"{record['multi_face_share']}, dropped: {record['dropped']}")
    pair = decisions["pair"]
    several = PAIR_FRAMES - len(PAIR_SINGLE)
    assert pair["tried"] == PAIR_FRAMES and pair["rejected"] == {"no_face": 0, "several_faces": several}
    assert pair["multi_face_share"] == round(several / PAIR_FRAMES, 4) > MAX_MULTI_FACE_SHARE
    assert pair["faces"] == [] and not (tmp_path / "filtered" / "crops" / "pair").exists()
    assert pair["dropped"] == (f"several people: {several} of {PAIR_FRAMES} examined frames with a face show two "
                               f"or more faces ({several / PAIR_FRAMES:.0%} > --max-multi-face-share 0.2)")
    assert decisions["mixed"]["dropped"].startswith("several people: 13 of 16 examined frames")
    assert decisions["astro/a1"]["dropped"] is None and decisions["astro/a1"]["multi_face_share"] == 0
    assert sorted(load_pool(tmp_path / "filtered")) == ["astro/a1"]
    assert dropped_videos(tmp_path / "filtered")["pair"] == pair["dropped"]
    kept = pool_video(Video(pair_video, "pair"), detector, tmp_path / "all", PoolSettings(max_multi_face_share=1.0))
    assert kept["dropped"] is None and sorted(f["frame"] for f in kept["faces"]) == list(PAIR_SINGLE)
    assert kept["rejected"] == pair["rejected"]  # the same walk: only the decision differs


def test_the_multi_face_threshold():
    assert multi_face_share(5, 0) == 0 and multi_face_share(0, 0) == 0 and multi_face_share(0, 3) == 1
    assert multi_face_share(5, 1) <= MAX_MULTI_FACE_SHARE < multi_face_share(5, 2)  # the documented rule


def test_frames_are_taken_in_the_seeded_shuffle(pool: Path, videos: Path, detector: FaceDetector,
                                                tmp_path: Path) -> None:
    record = read_record(pool, "astro/a1")
    assert record["seed"] == video_seed(0, "astro/a1")
    order = shuffled_order(record["seed"], 12)
    assert sorted(order) == list(range(12))
    assert [face["frame"] for face in record["faces"]] == order[:5]  # every frame has the face
    video = Video(videos / "astro" / "a1.mp4", "astro/a1")
    again = pool_video(video, detector, tmp_path / "same", PoolSettings(seed=0))
    assert again["faces"] == record["faces"]
    other = pool_video(video, detector, tmp_path / "other", PoolSettings(seed=1))
    assert other["seed"] == video_seed(1, "astro/a1") != record["seed"]
    assert [f["frame"] for f in other["faces"]] == shuffled_order(other["seed"], 12)[:5]
    assert [f["frame"] for f in other["faces"]] != order[:5]
    # the mixed video walks its shuffle too: the face frames come in shuffled order
    mixed = read_record(pool, "mixed")
    shuffled_faces = [i for i in shuffled_order(mixed["seed"], MIXED_FRAMES) if i in MIXED_FACE_FRAMES]
    assert [f["frame"] for f in mixed["faces"]] == shuffled_faces


def test_video_seeds_and_shards_depend_on_the_id_only() -> None:
    assert video_seed(0, "a") == video_seed(0, "a") != video_seed(0, "b")
    assert video_seed(0, "a") != video_seed(1, "a")
    videos = [Video(Path(f"v{i}.mp4"), f"folder/v{i}") for i in range(200)]
    for count in (1, 2, 3, 7):
        shards = [select_shard(videos, index, count) for index in range(count)]
        ids = [video.id for shard in shards for video in shard]
        assert sorted(ids) == sorted(video.id for video in videos)  # every video exactly once
        assert len(set(ids)) == len(ids)
        if count > 1:
            assert min(map(len, shards)) > 0.5 * len(videos) / count  # a roughly even split
        # the split does not depend on the input order
        assert [v.id for v in select_shard(videos[::-1], 0, count)] == [v.id for v in shards[0]][::-1]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(TrainingError, match="shard"):
            parse_shard(bad)


def test_shards_together_build_the_whole_pool(pool: Path, videos: Path, scrfd_onnx: Path,
                                              tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    for shard in ("0/2", "1/2"):
        # a shard holding only dropped videos ends with "the pool is empty": exit 1 is allowed
        _pool_cli(videos, "--out", out, "--detector", scrfd_onnx, "--shard", shard, "--provider", "cpu")
    assert _records(out) == _records(pool)
    assert (out / "dropped.txt").read_text() == (pool / "dropped.txt").read_text()


# ----------------------------------------------------------------------------- resuming, workers

def test_rerun_skips_finished_videos_and_redoes_an_interrupted_one(pool: Path, videos: Path,
                                                                   scrfd_onnx: Path, tmp_path: Path,
                                                                   capsys) -> None:
    out = tmp_path / "pool"
    shutil.copytree(pool, out)  # copy2 keeps the modification times
    (out / "videos" / "mixed.json").unlink()  # interrupted: crops written, record not
    stale = out / "crops" / "mixed" / "000099.png"
    stale.write_bytes(b"left over")
    times = {p: p.stat().st_mtime_ns for p in (out / "videos").rglob("*.json")}
    capsys.readouterr()
    assert _pool_cli(videos, "--out", out, "--detector", scrfd_onnx, "--provider", "cpu") == 0
    assert {p: p.stat().st_mtime_ns for p in times} == times  # finished videos untouched
    assert _records(out) == _records(pool)  # the interrupted one redone, identically
    assert not stale.exists()
    assert "3 videos with faces (11 crops), 2 dropped" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="other settings: seed 0 \\(now 1\\)"):
        cli_args = ["pool", str(videos), "--out", str(out), "--detector", str(scrfd_onnx), "--seed", "1"]
        args = cli.build_parser("pool").parse_args(cli_args)
        args.run(args)


def _run_module(import_root: Path, *args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", "id_animator.train", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=import_root)


def test_two_workers_give_the_same_pool_as_one(pool: Path, videos: Path, scrfd_onnx: Path,
                                               tmp_path: Path, import_root: Path) -> None:
    out = tmp_path / "two"
    done = _run_module(import_root, "pool", videos, "--out", out, "--detector", scrfd_onnx,
                       "--workers", "2", "--provider", "cpu", *KEEP_ALL)
    assert done.returncode == 0, done.stderr
    assert "face pool" in done.stderr  # the progress bar
    assert _records(out) == _records(pool)
    for crop in (pool / "crops").rglob("*.png"):
        assert (out / crop.relative_to(pool)).read_bytes() == crop.read_bytes()


# ----------------------------------------------------------------------------- errors

def test_help_names_every_option(import_root: Path) -> None:
    done = _run_module(import_root, "pool", "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--detector", "--workers", "--shard", "--faces-per-video", "--seed", "--provider",
                   "--max-multi-face-share"):
        assert option in done.stdout


def test_missing_folder_is_a_clear_error(import_root: Path, scrfd_onnx: Path, tmp_path: Path) -> None:
    done = _run_module(import_root, "pool", tmp_path / "nowhere", "--out", tmp_path / "p",
                       "--detector", scrfd_onnx)
    assert done.returncode == 1
    assert "nowhere does not exist" in done.stderr and "Traceback" not in done.stderr


def test_an_unreadable_video_is_dropped_and_fails_the_run(videos: Path, scrfd_onnx: Path,
                                                          tmp_path: Path, capsys) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(videos / "astro" / "a2.mp4", folder / "good.mp4")
    (folder / "broken.mp4").write_bytes(b"this is not a video" * 100)
    out = tmp_path / "pool"
    for _ in range(2):  # unreadable videos are retried, and fail again
        assert _pool_cli(folder, "--out", out, "--detector", scrfd_onnx, "--provider", "cpu") == 1
        err = capsys.readouterr().err
        assert "1 video(s) could not be read, e.g. broken" in err and "re-encode" in err
    assert sorted(load_pool(out)) == ["good"]
    assert dropped_videos(out)["broken"].startswith("unreadable: cannot decode")
    assert (out / "dropped.txt").read_text().startswith("broken\tunreadable: ")


@pytest.mark.parametrize("kind", ["missing", "not onnx", "not a detector"])
def test_a_wrong_detector_is_a_clear_error(kind: str, videos: Path, tmp_path: Path, capsys) -> None:
    detector = tmp_path / "det"
    if kind == "not onnx":
        detector.mkdir()
        (detector / "det_10g.onnx").write_bytes(b"\0" * 64)
    elif kind == "not a detector":
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
        detector = tmp_path / "relu.onnx"
        onnx.save(helper.make_model(graph), str(detector))
    out = tmp_path / "pool"
    assert _pool_cli(videos, "--out", out, "--detector", detector) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --detector {detector}:")
    assert {"missing": "not found", "not onnx": "No face detection model",
            "not a detector": "No face detection model"}[kind] in err
    assert not (out / "videos").exists()  # nothing done


def test_the_pool_detector_runs_one_onnxruntime_thread(scrfd_onnx: Path) -> None:
    from id_animator.train.face_pool import load_detector

    session = load_detector(scrfd_onnx, "cpu")._model.session
    assert session.get_session_options().intra_op_num_threads == 1


def test_load_pool_of_a_folder_that_is_no_pool(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="is not a face pool"):
        load_pool(tmp_path)
