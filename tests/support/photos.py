"""Real photos for the test bed (public domain), written into ComfyUI's input folder."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

ASTRONAUT = "astronaut.png"  # Eileen Collins, NASA: one frontal face
SOLVAY = "solvay_1927.jpg"  # Solvay conference 1927: 29 faces
NO_FACE = "rocket.png"  # skimage's rocket: no face
NEWTON = "newton.png"  # a portrait painting


def write_inputs(input_dir: Path, scrfd_root: Path) -> None:
    import skimage.data

    input_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(skimage.data.astronaut()).save(input_dir / ASTRONAUT)
    Image.fromarray(skimage.data.rocket()).save(input_dir / NO_FACE)
    shutil.copy(scrfd_root / "images" / "solvay_conference_1927.jpg", input_dir / SOLVAY)
    shutil.copy(scrfd_root / "images" / "newton.png", input_dir / NEWTON)


def astronaut_image() -> np.ndarray:
    import skimage.data

    return skimage.data.astronaut()
