"""Finding the training videos and reading their frames (PyAV).

A video's id is its path relative to the folder (or list file) it was found through, without the
suffix, e.g. `celebv/abc123`: the face pool, the captions and the latent cache all key on it, so
the three steps can run separately, on different machines, and still meet.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..adapter.errors import TrainingError

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".gif")


@dataclass(frozen=True)
class Video:
    path: Path
    id: str  # relative path without suffix, '/'-separated


def _from_folder(folder: Path) -> list[Video]:
    return [Video(path, path.relative_to(folder).with_suffix("").as_posix())
            for path in sorted(folder.rglob("*")) if path.suffix.lower() in VIDEO_SUFFIXES
            and path.is_file()]


def _from_list(list_file: Path) -> list[Video]:
    """A text file with one video path per line (relative to the list's folder); # comments."""
    videos = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        path = (list_file.parent / line).resolve()
        if not path.is_file():
            raise TrainingError(f"{list_file}:{number}: no video at {path}; fix the line or remove it.")
        videos.append(Video(path, Path(line).with_suffix("").as_posix().lstrip("./")))
    return videos


def find_videos(inputs: Sequence[str | Path]) -> list[Video]:
    """Videos from folders (searched recursively), single files and `.txt` lists, ids unique."""
    videos: list[Video] = []
    for item in map(Path, inputs):
        if item.is_dir():
            videos += _from_folder(item)
        elif item.is_file() and item.suffix.lower() == ".txt":
            videos += _from_list(item)
        elif item.is_file() and item.suffix.lower() in VIDEO_SUFFIXES:
            videos.append(Video(item, item.stem))
        elif item.exists():
            raise TrainingError(f"{item} is neither a folder, a video ({', '.join(VIDEO_SUFFIXES)}) "
                                f"nor a .txt list of videos.")
        else:
            raise TrainingError(f"{item} does not exist; give a folder of videos, video files or a .txt list.")
    seen: dict[str, Path] = {}
    for video in videos:
        if video.id in seen and seen[video.id] != video.path:
            raise TrainingError(f"Two videos share the id {video.id!r}: {seen[video.id]} and {video.path}; "
                                f"rename one (ids are paths relative to the folder given, without suffix).")
        seen[video.id] = video.path
    if not videos:
        raise TrainingError(f"No videos found in {', '.join(map(str, inputs))} (looked for "
                            f"{', '.join(VIDEO_SUFFIXES)}).")
    return list({video.id: video for video in videos}.values())


def frame_count(path: Path) -> int:
    """The number of frames, counted by decoding (container metadata is often wrong)."""
    return sum(1 for _ in read_frames(path))


def read_frames(path: Path, indices: Sequence[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, RGB uint8 (H, W, 3)) for every frame, or only for `indices`, in decoding order."""
    import av

    wanted = None if indices is None else set(indices)
    last = None if wanted is None else max(wanted, default=-1)
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise TrainingError(f"{path} has no video stream.")
            for index, frame in enumerate(container.decode(video=0)):
                if last is not None and index > last:
                    break
                if wanted is None or index in wanted:
                    yield index, frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError) as error:
        raise TrainingError(f"Cannot read video {path}: {error}. Re-encode it (e.g. ffmpeg -i IN -c:v "
                            f"libx264 OUT.mp4) or remove it from the dataset.") from error
