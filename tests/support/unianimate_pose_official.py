"""The official UniAnimate pose code (`dwpose/` and `run_align_pose.py` at 643c963), imported from
the checkout `support.unianimate_official` makes, for the pose parity tests; nothing is copied.

Only imports the test bed lacks are stubbed, never the maths:
- `oss2` (imported by run_align_pose, unused): an empty module;
- `matplotlib` (dwpose/util uses only `matplotlib.colors.hsv_to_rgb` for the hand edge colours):
  `colors.hsv_to_rgb` is Python's own `colorsys.hsv_to_rgb`, the same sextant formula, an
  implementation independent of the pack's `draw.hue_colour`.

`run_official(...)` drives `run_align_pose.mp_main` as its command line does, with the two I/O
ends replaced: `cv2.VideoCapture` yields the given BGR frames (the script reads an mp4), and
`cv2.imwrite` records the arrays the script would encode as JPEG (the comparison is made before
JPEG, which cannot be matched bit for bit). The DWPose model is either the official
`DWposeDetector` on ONNX files in `checkpoints/` of the working directory (where the official
`Wholebody` looks), or a stand-in returning given pose dicts, for alignment on given keypoints.
"""
from __future__ import annotations

import colorsys
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from support.checkout_import import load_file, namespace_package, visible_while_importing
from support.unianimate_official import official_checkout

NAMES = ("dwpose",)  # the official absolute package, visible only while importing (the stubs too)
_MODULES: dict[str, types.ModuleType] = {}


def _stubs() -> dict[str, types.ModuleType]:
    matplotlib, colors = types.ModuleType("matplotlib"), types.ModuleType("matplotlib.colors")
    colors.hsv_to_rgb = lambda hsv: np.array(colorsys.hsv_to_rgb(*hsv))
    matplotlib.colors = colors
    return {"oss2": types.ModuleType("oss2"), "matplotlib": matplotlib, "matplotlib.colors": colors}


def official_pose(cache: Path) -> dict[str, types.ModuleType]:
    """{'onnxdet', 'onnxpose', 'util', 'wholebody', 'run_align_pose'} official modules, imported once.
    The official absolute names (`dwpose.*`) are in sys.modules only while they import."""
    if _MODULES:
        return _MODULES
    root = official_checkout(cache)
    with visible_while_importing(NAMES, _stubs()):
        package = namespace_package("dwpose", root / "dwpose")
        for name in ("onnxdet", "onnxpose", "util", "wholebody"):
            _MODULES[name] = load_file(f"dwpose.{name}", root / "dwpose" / f"{name}.py")
            setattr(package, name, _MODULES[name])
        _MODULES["run_align_pose"] = load_file("unianimate_official_run_align_pose", root / "run_align_pose.py")
    return _MODULES


class FrameReader:
    """cv2.VideoCapture over frames in memory (what the official script reads from the mp4)."""

    def __init__(self, frames: list[np.ndarray]):
        self.frames, self.index = frames, 0

    def isOpened(self) -> bool:  # noqa: N802 - cv2's name
        return True

    def read(self):
        if self.index >= len(self.frames):
            return False, None
        self.index += 1
        return True, self.frames[self.index - 1].copy()

    def release(self) -> None:
        pass


@dataclass
class OfficialRun:
    frames: list[np.ndarray]  # the arrays written as 0000.jpg, 0001.jpg, ...
    reference: np.ndarray  # the array written as ref_pose.jpg


def run_official(cache: Path, workdir: Path, frames_bgr: list[np.ndarray], reference_bgr: np.ndarray,
                 monkeypatch, detector: Callable[[], Callable] | None = None) -> OfficialRun:
    """`run_align_pose.mp_main` on in-memory frames; `detector` replaces DWposeDetector when given
    (a factory, as the script constructs it). Without it, `workdir/checkpoints/` must hold the
    two ONNX files."""
    modules = official_pose(cache)
    script = modules["run_align_pose"]
    written: dict[str, np.ndarray] = {}
    reference_path = workdir / "reference.png"  # lossless: cv2.imread gives back the same pixels
    cv2.imwrite(str(reference_path), reference_bgr)
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(script.cv2, "VideoCapture", lambda path: FrameReader(frames_bgr))
    monkeypatch.setattr(script.cv2, "imwrite", lambda path, array: written.__setitem__(os.path.basename(path),
                                                                                       array.copy()) or True)
    if detector is not None:
        monkeypatch.setattr(script, "DWposeDetector", detector)
    args = types.SimpleNamespace(source_video_paths=str(workdir / "driving.mp4"), ref_name=str(reference_path),
                                 saved_pose_dir=str(workdir / "poses"))
    script.mp_main(args)
    monkeypatch.undo()
    return OfficialRun([written[f"{i:04d}.jpg"] for i in range(len(frames_bgr))], written["ref_pose.jpg"])
