"""The face pool (paper §3.3.2, "random face extraction"): per video, up to 5 aligned single-face crops.

For each video the frames are shuffled with a per-video seed, then taken in that order: a frame
with exactly one detected face gives a crop, a frame with more than one face is rejected (the
paper: "discarded and another frame is taken"), and so is a frame with no face (it has nothing to
crop; both are counted in the video's "rejected"). The walk stops at `--faces-per-video` crops or
when the frames run out. A video whose pool stays empty is dropped (reason in its record, in
`POOL/dropped.txt` and in the summary); training never sees it.

Videos of several people (paper §4.1: "videos with multiple faces" were filtered out, 15k -> 13k
CelebV-HQ videos) are dropped at the video level: among the frames the walk examined that show a
face, the share showing two or more must not exceed `--max-multi-face-share` (default 0.2: with
the 5 single-face frames a walk needs, one two-face frame (1/6) is tolerated, as a passer-by or a
poster in the background; two (2/7) drop the video). The counts are in the record and the
reason; `--max-multi-face-share 1` keeps every video with a single-face frame.

Counting and cropping detect at different sizes, each for its purpose. Counting runs at
`--det-size` (default 640, where small background faces are found: a frame must be *seen* to hold
two faces to be rejected). The crop is exactly the inference crop: FaceEncode's detection
(`adapter.face_detection.detect_and_align`: 320 first, as the official code, then other sizes;
its face selection) -> SCRFD keypoints -> ArcFace similarity alignment at 112 -> 224.

Shuffle: frame i gets the i-th draw of `numpy.random.default_rng(video_seed)`; the frames sorted by
their draw are a uniform random permutation that needs no frame count up front, so one decoding
pass finds the first candidates and converts only those frames to RGB. `video_seed` is derived
from `--seed` and the video id (blake2b), so it does not depend on shards, workers or the order
of the inputs, and it is stored in the video's record.

Output (the contract with `train/data.py`):
- `POOL/videos/<video_id>.json`: {"video", "id", "seed", "frames", "faces": [{"frame", "box",
  "score", "crop", "kps"}] (box, score and keypoints of the crop's detection), "rejected":
  {"no_face", "several_faces"}, "tried", "multi_face_share", "dropped"}; written
  last and atomically, so its presence means the video is finished: a re-run skips it.
- `POOL/crops/<video_id>/<frame:06d>.png`: 224x224 RGB, lossless.
- `POOL/pool.json`: the settings; a re-run with other settings is refused (mixed pools).
- `POOL/dropped.txt`: `<video_id>\\t<reason>` for every dropped video in the pool.

An unreadable video is recorded as dropped ("unreadable: ...") and the run goes on; at the end the
command exits with status 1 and names it. Unreadable videos are retried on every run (fix or
re-encode the file and run again); other dropped videos are final (`--retry-dropped` redoes them).

Many machines: `--shard i/n` (0 <= i < n) takes the videos whose id hashes to i, so every video
is in exactly one shard whatever the machine's file order, and adding videos moves none.
"""
from __future__ import annotations

import argparse
import hashlib
import heapq
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter.errors import IDAnimatorError, TrainingError
from ..adapter.files import refuse_other_settings, write_atomic
from .video import Video, find_videos

logger = logging.getLogger(__name__)

FACES_PER_VIDEO = 5  # paper §3.3.2: "five randomly chosen frames"
DET_SIZE = 640
MAX_MULTI_FACE_SHARE = 0.2  # see the module docstring
UNREADABLE = "unreadable: "  # prefix of the dropped reason of a video that could not be decoded
_KEY_BLOCK = 4096  # shuffle keys are drawn in blocks of this many frames


@dataclass(frozen=True)
class PoolFace:
    """One crop of a video's face pool: the frame it came from, the PNG, its box and score."""

    frame: int
    crop: Path
    box: tuple[float, float, float, float]
    score: float


@dataclass(frozen=True)
class PoolSettings:
    """What decides a pool's content; stored in POOL/pool.json so shards and re-runs agree."""

    seed: int = 0
    faces_per_video: int = FACES_PER_VIDEO
    det_size: int = DET_SIZE
    det_thresh: float = 0.5
    max_tries: int = 0  # frames examined per video at most; 0 = all (the paper's rule)
    max_multi_face_share: float = MAX_MULTI_FACE_SHARE  # of examined frames with a face; 1 = off


# ----------------------------------------------------------------------------- seeds and shards

def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def video_seed(seed: int, video_id: str) -> int:
    """The per-video shuffle seed: from the run's seed and the video id only (63 bits)."""
    return _hash64(f"{seed}\0{video_id}") >> 1


def shard_of(video_id: str, count: int) -> int:
    """The shard (0..count-1) a video belongs to: a hash of its id, independent of other videos."""
    return _hash64(f"shard\0{video_id}") % count


def parse_shard(text: str) -> tuple[int, int]:
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise TrainingError(f"--shard wants i/n (e.g. 0/4 ... 3/4 for four machines), got {text!r}.") from None
    if count < 1 or not 0 <= index < count:
        raise TrainingError(f"--shard {text}: shards are numbered 0..n-1 with n >= 1 "
                            f"(e.g. 0/4 ... 3/4 for four machines).")
    return index, count


def select_shard(videos: list[Video], index: int, count: int) -> list[Video]:
    """The videos of shard `index` of `count`, in input order."""
    return [video for video in videos if shard_of(video.id, count) == index]


class _FrameKeys:
    """Shuffle key of frame i: the i-th draw of the video's generator (frames sorted by key =
    a uniform random permutation, without knowing the frame count)."""

    def __init__(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)
        self._keys = np.empty(0, dtype=np.int64)

    def __getitem__(self, index: int) -> int:
        while index >= len(self._keys):
            block = self._rng.integers(0, 2 ** 62, _KEY_BLOCK, dtype=np.int64)
            self._keys = np.concatenate([self._keys, block])
        return int(self._keys[index])


# ----------------------------------------------------------------------------- decoding

def _candidates(path: Path, keys: _FrameKeys, after: tuple[int, int] | None, take: int
                ) -> tuple[int, list[tuple[tuple[int, int], np.ndarray]]]:
    """One decoding pass: (frame count, the `take` next frames in shuffled order after `after`,
    as ((key, index), RGB uint8)). Only the chosen frames are converted to RGB."""
    import av

    heap: list[tuple[int, int, Any]] = []  # max-heap on (key, index) through negation
    count = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TrainingError(f"{path} has no video stream.")
            for index, frame in enumerate(container.decode(video=0)):
                count += 1
                order = (keys[index], index)
                if after is not None and order <= after:
                    continue
                item = (-order[0], -index, frame)
                if len(heap) < take:
                    heapq.heappush(heap, item)
                elif item > heap[0]:  # smaller (key, index) than the largest kept
                    heapq.heapreplace(heap, item)
            chosen = sorted(((-k, -i), frame.to_ndarray(format="rgb24")) for k, i, frame in heap)
    except (av.error.FFmpegError, OSError) as error:
        raise TrainingError(f"cannot decode {path}: {error}") from error
    return count, chosen


# ----------------------------------------------------------------------------- one video

def _record_path(pool_dir: Path, video_id: str) -> Path:
    return pool_dir / "videos" / f"{video_id}.json"


def _crop_name(video_id: str, frame: int) -> str:
    return f"crops/{video_id}/{frame:06d}.png"


def _write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a re-run) sees the old file or the whole new one, never a part."""
    write_atomic(path, json.dumps(data) + "\n")  # one line: 15k records stay small


def read_record(pool_dir: str | Path, video_id: str) -> dict | None:
    """A finished video's record, or None when it is not finished."""
    path = _record_path(Path(pool_dir), video_id)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"Damaged face pool record {path}: {error}. Delete it and run `pool` "
                            f"again to redo that video.") from error


def pool_video(video: Video, detector: Any, pool_dir: Path, settings: PoolSettings) -> dict:
    """Build one video's pool: walk its shuffled frames, keep single-face crops, write the record."""
    from PIL import Image

    from ..adapter.face_detection import detect_and_align

    seed = video_seed(settings.seed, video.id)
    keys = _FrameKeys(seed)
    crops_dir = pool_dir / "crops" / video.id
    shutil.rmtree(crops_dir, ignore_errors=True)  # an interrupted run's crops
    faces: list[dict] = []
    rejected = {"no_face": 0, "several_faces": 0}
    frames, tried, dropped = 0, 0, None
    after: tuple[int, int] | None = None
    take = 2 * settings.faces_per_video  # most frames of a talking-head video hold one face
    try:
        while len(faces) < settings.faces_per_video:
            if settings.max_tries:
                take = min(take, settings.max_tries - tried)
            count, candidates = _candidates(video.path, keys, after, take)
            frames = max(frames, count)
            for order, rgb in candidates:
                after, tried = order, tried + 1
                found = detector.detect(rgb, settings.det_size)
                if len(found) != 1:
                    rejected["no_face" if not found else "several_faces"] += 1
                    continue
                aligned = detect_and_align(detector, rgb)  # FaceEncode's crop (module docstring)
                if aligned is None:  # found at det_size only: no crop inference would make
                    rejected["no_face"] += 1
                    continue
                face, index = aligned.face, order[1]
                crops_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(aligned.crop).save(  # lossless; level 1: 3x faster than 6
                    pool_dir / _crop_name(video.id, index), compress_level=1)
                faces.append({"frame": index, "box": [round(float(v), 3) for v in face.bbox],
                              "score": round(float(face.score), 6), "crop": _crop_name(video.id, index),
                              "kps": [[round(float(v), 3) for v in point] for point in face.kps]})
                if len(faces) == settings.faces_per_video:
                    break
            exhausted = len(candidates) < take or (settings.max_tries and tried >= settings.max_tries)
            if exhausted:
                break
            take *= 2  # frames so far were rejected: look further, in fewer passes
    except TrainingError as error:
        dropped, faces = f"{UNREADABLE}{error}", []
        shutil.rmtree(crops_dir, ignore_errors=True)
    share = multi_face_share(len(faces), rejected["several_faces"])
    if dropped is None and not faces:
        dropped = ("no frames decoded" if frames == 0 else
                   f"no single-face frame among {tried} of {frames} frames "
                   f"({rejected['no_face']} without a face, {rejected['several_faces']} with several)")
    elif dropped is None and share > settings.max_multi_face_share:
        dropped = (f"several people: {rejected['several_faces']} of {len(faces) + rejected['several_faces']} "
                   f"examined frames with a face show two or more faces ({share:.0%} > "
                   f"--max-multi-face-share {settings.max_multi_face_share:g})")
        faces = []
        shutil.rmtree(crops_dir, ignore_errors=True)
    record = {"video": str(video.path.resolve()), "id": video.id, "seed": seed, "frames": frames,
              "faces": faces, "rejected": rejected, "tried": tried, "multi_face_share": round(share, 4),
              "dropped": dropped}
    _write_json(_record_path(pool_dir, video.id), record)
    return record


def multi_face_share(single: int, several: int) -> float:
    """Share of the examined frames with a face that show two or more (0 when none shows one)."""
    return several / (single + several) if single + several else 0.0


# ----------------------------------------------------------------------------- reading a pool

def _records(pool_dir: Path) -> Iterator[dict]:
    folder = pool_dir / "videos"
    if not folder.is_dir():
        raise TrainingError(f"{pool_dir} is not a face pool (no videos/ folder); build one with "
                            f"`python -m id_animator.train pool VIDEOS --out {pool_dir}`.")
    for path in sorted(folder.rglob("*.json")):
        try:
            yield json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise TrainingError(f"Damaged face pool record {path}: {error}. Delete it and run "
                                f"`pool` again to redo that video.") from error


def load_pool(pool_dir: str | Path) -> dict[str, list[PoolFace]]:
    """video_id -> its pool's faces (crop paths absolute); dropped videos are left out."""
    pool_dir = Path(pool_dir)
    pool = {}
    for record in _records(pool_dir):
        if record.get("dropped") or not record.get("faces"):
            continue
        pool[record["id"]] = [PoolFace(frame=int(face["frame"]), crop=pool_dir / face["crop"],
                                       box=tuple(float(v) for v in face["box"]), score=float(face["score"]))
                              for face in record["faces"]]
    return pool


def dropped_videos(pool_dir: str | Path) -> dict[str, str]:
    """video_id -> why it was dropped, for every dropped video in the pool."""
    return {record["id"]: record["dropped"] for record in _records(Path(pool_dir)) if record.get("dropped")}


def write_dropped_list(pool_dir: Path) -> Path:
    """POOL/dropped.txt from the records (all shards that share the folder)."""
    lines = [f"{video_id}\t{reason}\n" for video_id, reason in sorted(dropped_videos(pool_dir).items())]
    path = pool_dir / "dropped.txt"
    write_atomic(path, "".join(lines))
    return path


def _check_settings(pool_dir: Path, settings: PoolSettings) -> None:
    """Refuse to mix pools built with other settings; record them on first use."""
    refuse_other_settings(pool_dir / "pool.json", asdict(settings), what=f"The face pool {pool_dir}",
                          fix="Use the same settings to resume it, or a new --out folder.")


# ----------------------------------------------------------------------------- detector and workers

def load_detector(detector_path: str | Path, provider: str = "CPU", det_thresh: float = 0.5) -> Any:
    """Our SCRFD FaceDetector on one onnxruntime thread (workers share the cores)."""
    import cv2

    from ..adapter.face_detection import FaceDetector, resolve_providers

    cv2.setNumThreads(1)  # the crops' warps; workers are processes, one core each
    return FaceDetector(detector_path, providers=resolve_providers(provider), det_thresh=det_thresh, threads=1)


_WORKER: dict[str, Any] = {}  # the detector of a worker process


def _worker_start(detector_path: str, provider: str, det_thresh: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    _WORKER["detector"] = load_detector(detector_path, provider, det_thresh)


def _worker_pool_video(video: Video, pool_dir: Path, settings: PoolSettings) -> dict:
    return pool_video(video, _WORKER["detector"], pool_dir, settings)


def _run_videos(videos: list[Video], args: argparse.Namespace, settings: PoolSettings,
                detector: Any) -> Iterator[dict]:
    """Records of `videos`, in completion order, on `args.workers` processes."""
    if args.workers <= 1:
        for video in videos:
            yield pool_video(video, detector, args.out, settings)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # spawn: onnxruntime and PyAV are not fork-safe once loaded
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_start,
                             initargs=(str(args.detector), args.provider, settings.det_thresh)) as pool:
        futures = [pool.submit(_worker_pool_video, video, args.out, settings) for video in videos]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# ----------------------------------------------------------------------------- command line

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="VIDEOS",
                        help="video folders (searched recursively), video files or .txt lists of videos")
    parser.add_argument("--out", type=Path, required=True, metavar="POOL",
                        help="the face pool folder (created; a re-run resumes it)")
    parser.add_argument("--detector", type=Path, required=True,
                        help="insightface pack folder (e.g. models/insightface/models/buffalo_l) "
                             "or its detection .onnx (det_10g.onnx, scrfd_10g_bnkps.onnx)")
    parser.add_argument("--provider", default="auto", choices=["auto", "cpu", "cuda", "rocm", "coreml"],
                        type=str.lower, help="onnxruntime provider for detection (default: auto)")
    parser.add_argument("--faces-per-video", type=int, default=FACES_PER_VIDEO,
                        help="crops kept per video (paper: 5)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (per video: derived from it and the id)")
    parser.add_argument("--det-size", type=int, default=DET_SIZE,
                        help="detection size for counting faces, multiple of 32 (default 640: finds small "
                             "background faces, so multi-face frames are rejected); crops use FaceEncode's "
                             "detection (320 first), so they equal inference crops")
    parser.add_argument("--det-thresh", type=float, default=0.5, help="detection score threshold")
    parser.add_argument("--max-multi-face-share", type=float, default=MAX_MULTI_FACE_SHARE,
                        help="drop a video when more than this share of its examined frames with a face show "
                             f"two or more faces (paper §4.1; default {MAX_MULTI_FACE_SHARE}: one such frame "
                             "beside 5 single-face ones is kept, two are not; 1 = keep every video)")
    parser.add_argument("--max-tries", type=int, default=0,
                        help="frames examined per video at most (0 = all, the paper's rule; "
                             "e.g. 60 bounds the time spent on videos with several people)")
    parser.add_argument("--workers", type=int, default=1,
                        help="detector processes on this machine (one onnxruntime thread each)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="this machine's part of the dataset: I of N (0-based), split by a hash of the id")
    parser.add_argument("--retry-dropped", action="store_true",
                        help="redo videos dropped before (unreadable ones are always retried)")


def _finished(record: dict | None, retry_dropped: bool) -> bool:
    if record is None:
        return False
    reason = record.get("dropped") or ""
    return not (reason.startswith(UNREADABLE) or (retry_dropped and reason))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.faces_per_video < 1:
        raise TrainingError(f"--faces-per-video must be at least 1, got {args.faces_per_video}.")
    if args.workers < 1:
        raise TrainingError(f"--workers must be at least 1, got {args.workers}.")
    if not 0.0 <= args.max_multi_face_share <= 1.0:
        raise TrainingError(f"--max-multi-face-share must be a share in [0, 1], got {args.max_multi_face_share}.")
    if args.max_tries < 0:
        raise TrainingError(f"--max-tries must be 0 (all frames) or more, got {args.max_tries}.")
    index, count = parse_shard(args.shard)
    videos = select_shard(find_videos(args.inputs), index, count)
    if not videos:
        raise TrainingError(f"Shard {index}/{count} holds none of the videos; use fewer shards.")
    settings = PoolSettings(seed=args.seed, faces_per_video=args.faces_per_video, det_size=args.det_size,
                            det_thresh=args.det_thresh, max_tries=args.max_tries,
                            max_multi_face_share=args.max_multi_face_share)
    try:  # loaded here also when workers load their own: a wrong detector fails before any work
        detector = load_detector(args.detector, args.provider, args.det_thresh)
    except IDAnimatorError as error:
        raise TrainingError(f"--detector {args.detector}: {error}") from error
    try:
        detector.input_size(args.det_size)
    except IDAnimatorError as error:
        raise TrainingError(f"--det-size {args.det_size}: {error}") from error
    args.out.mkdir(parents=True, exist_ok=True)
    _check_settings(args.out, settings)
    records = {video.id: read_record(args.out, video.id) for video in videos}
    todo = [video for video in videos if not _finished(records[video.id], args.retry_dropped)]
    logger.info("face pool: %d videos in shard %d/%d, %d finished before, %d to do",
                len(videos), index, count, len(videos) - len(todo), len(todo))
    with tqdm(total=len(todo), desc="face pool", unit="video", file=sys.stderr, dynamic_ncols=True) as bar:
        for record in _run_videos(todo, args, settings, detector):
            records[record["id"]] = record
            bar.update()
    write_dropped_list(args.out)
    return _report(args.out, videos, records)


def _report(pool_dir: Path, videos: list[Video], records: dict[str, dict]) -> int:
    """One summary line (stdout), the dropped videos (stderr); an error if any was unreadable."""
    dropped = {v.id: records[v.id]["dropped"] for v in videos if records[v.id]["dropped"]}
    crops = sum(len(records[v.id]["faces"]) for v in videos)
    for video_id, reason in list(dropped.items())[:20]:
        print(f"dropped {video_id}: {reason}", file=sys.stderr)
    if len(dropped) > 20:
        print(f"... and {len(dropped) - 20} more", file=sys.stderr)
    print(f"face pool {pool_dir}: {len(videos) - len(dropped)} videos with faces ({crops} crops), "
          f"{len(dropped)} dropped" + (f" (listed in {pool_dir / 'dropped.txt'})" if dropped else ""))
    unreadable = [video_id for video_id, reason in dropped.items() if reason.startswith(UNREADABLE)]
    if unreadable:
        raise TrainingError(f"{len(unreadable)} video(s) could not be read, e.g. {unreadable[0]}: "
                            f"{dropped[unreadable[0]][len(UNREADABLE):]}. The pool holds the other "
                            f"videos; re-encode or remove these and run again (they are retried).")
    if len(dropped) == len(videos):
        raise TrainingError(f"No video of {len(videos)} has a single-face frame, so the face pool "
                            f"is empty (reasons in {pool_dir / 'dropped.txt'}).")
    return 0
