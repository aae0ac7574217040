"""Face pool throughput: videos/min and frames/s of the `pool` command on CPU, 1 and 2 workers.

24 synthetic H.264 videos of 96 frames at 512x512 (tests/support/videos.py): a real photo (the
astronaut) moving a few pixels per frame; in every 4th video every other frame is the Solvay group
photo instead, whose frames the pool must reject (several faces), so the walk reads further. The
detector is the real SCRFD (scrfd 0.3.0 sdist, the test bed's). Each run is the real command
(`python -m id_animator.train pool`) in a fresh process on a fresh output folder; wall time
includes its start-up (imports, loading the detector in each worker). Frames decoded and
detections come from the pool's records.

    python bench/face_pool.py
"""
from __future__ import annotations

import common  # noqa: I001  (sets up sys.path for the test bed)

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VIDEOS, FRAMES, SIZE = 24, 96, 512


def write_videos(folder: Path, scrfd: Path) -> None:
    from support.photos import astronaut_image
    from support.videos import face_video_frames, write_video

    solvay = np.asarray(Image.open(scrfd / "images" / "solvay_conference_1927.jpg").convert("RGB"))
    for v in range(VIDEOS):
        frames = face_video_frames(astronaut_image(), FRAMES, size=SIZE, seed=v)
        if v % 4 == 3:
            group = face_video_frames(solvay, FRAMES, size=SIZE, seed=v)
            frames = [group[i] if i % 2 else frame for i, frame in enumerate(frames)]
        write_video(folder / f"v{v:02d}.mp4", frames, fps=25)


def run_pool(videos: Path, out: Path, detector: Path, workers: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(common.conftest.IMPORT_ROOT), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "id_animator.train", "pool", str(videos), "--out", str(out),
                    "--detector", str(detector), "--workers", str(workers),
                    "--max-multi-face-share", "1"],  # keep the mixed videos: the walk is what is timed
                   check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(p.read_text()) for p in (out / "videos").glob("*.json")]
    tried = sum(r["tried"] for r in records)
    crops = sum(len(r["faces"]) for r in records)
    return {"workers": workers, "wall_s": wall, "videos_per_min": len(records) / wall * 60,
            "frames_examined": tried, "frames_examined_per_s": tried / wall, "crops": crops,
            "rejected_several_faces": sum(r["rejected"]["several_faces"] for r in records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=common.RESULTS / "face_pool.json")
    args = parser.parse_args()
    scrfd = common.PATHS["scrfd"]
    with tempfile.TemporaryDirectory() as tmp:
        videos = Path(tmp) / "videos"
        write_videos(videos, scrfd)
        runs = []
        for workers in args.workers:
            load = common.load_average()
            result = {**run_pool(videos, Path(tmp) / f"pool{workers}", scrfd / "models" / "scrfd.onnx", workers),
                      "load_average_1min_before": load}
            runs.append(result)
            print(f"{workers} worker(s): {result['wall_s']:.1f} s, {result['videos_per_min']:.0f} videos/min, "
                  f"{result['frames_examined_per_s']:.1f} frames examined/s ({result['frames_examined']} frames, "
                  f"{result['crops']} crops, {result['rejected_several_faces']} multi-face frames rejected; "
                  f"load {load})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "python bench/face_pool.py " + " ".join(sys.argv[1:]), "machine": common.machine(), "videos": VIDEOS, "frames": FRAMES, "size": SIZE,
                                    "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
