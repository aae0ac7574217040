"""Small synthetic videos for the training tests, written with PyAV (H.264 in mp4, as datasets are).

`indexed_frames` draw each frame's index as a row of black/white blocks that survive compression,
so a test can tell which frame of which video a crop or a clip came from (`read_index`).
`face_video` moves a real photo a little from frame to frame, so a detector sees a real face in
every frame without the frames being identical.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

INDEX_BITS = 10  # frames 0..1023
BLOCK = 16  # pixels per bit block: large enough for yuv420 + crf 18 to keep the level


def write_video(path: Path, frames: Sequence[np.ndarray], fps: int = 8) -> Path:
    """Frames (H, W, 3) uint8 RGB, H and W even, as an H.264 mp4 (crf 18)."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def stamp_index(frame: np.ndarray, index: int) -> np.ndarray:
    """A copy of `frame` with `index` written as INDEX_BITS blocks along its top-left edge."""
    out = frame.copy()
    for bit in range(INDEX_BITS):
        out[:BLOCK, bit * BLOCK:(bit + 1) * BLOCK] = 255 if index >> bit & 1 else 0
    return out


def read_index(frame: np.ndarray) -> int:
    """The index `stamp_index` wrote (frame as decoded: RGB uint8, or float in [0, 1])."""
    scale = 255.0 if frame.dtype == np.uint8 else 1.0
    bits = [frame[2:BLOCK - 2, bit * BLOCK + 2:(bit + 1) * BLOCK - 2].mean() / scale > 0.5
            for bit in range(INDEX_BITS)]
    return sum(1 << bit for bit, on in enumerate(bits) if on)


def indexed_frames(count: int, size: tuple[int, int] = (64, 192), seed: int = 0) -> list[np.ndarray]:
    """`count` noisy grey frames (H, W) = size, each carrying its index."""
    rng = np.random.default_rng(seed)
    height, width = size
    base = rng.integers(64, 192, (height, width, 3), dtype=np.uint8)
    return [stamp_index(base, i) for i in range(count)]


def face_video_frames(photo: np.ndarray, count: int, size: int = 256, stamp: bool = True,
                      seed: int = 0) -> list[np.ndarray]:
    """`count` frames of `photo` (RGB) resized to size x size and shifted a few pixels each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = np.asarray(Image.fromarray(photo).convert("RGB").resize((size + 16, size + 16), Image.BICUBIC))
    frames = []
    for i in range(count):
        dy, dx = rng.integers(0, 16, 2)
        frame = np.ascontiguousarray(image[dy:dy + size, dx:dx + size])
        frames.append(stamp_index(frame, i) if stamp else frame)
    return frames
