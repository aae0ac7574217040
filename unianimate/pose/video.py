"""Reference photo + driving frames -> the pose images UniAnimate takes (official `run_align_pose`).

Decisions where the official script has none:
- no person in the reference: an error (the official code would estimate a pose on the whole
  image and animate a ghost);
- no person in driving frame 0: an error (the alignment is measured on it);
- no person in a later driving frame: by default a black pose frame and one warning naming the
  frames (the official script has no frame without a person: it estimates one on the whole image,
  which `missing_person="whole image (official)"` reproduces); or `"error"`;
- the alignment needs both shoulders and both hips in the reference and in frame 0.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from ...adapter.errors import PoseError
from .align import SCALE_POINTS, Alignment, align_poses
from .draw import CANVAS_HEIGHT, CANVAS_WIDTH, draw_pose
from .dwpose import DWPoseModel
from .keypoints import PoseKeypoints

logger = logging.getLogger(__name__)

ALIGN_MODES = ("official, missing bones kept", "official (exact)", "none")
MISSING_PERSON_MODES = ("black frame", "whole image (official)", "error")
BODY_NAMES = {2: "right shoulder", 5: "left shoulder", 8: "right hip", 11: "left hip"}


@dataclass
class PoseVideo:
    """Drawn canvases (as the official writes them, see `draw`), the keypoints behind them, and
    what the user should know (frames with no person, bones left unscaled)."""
    reference_canvas: np.ndarray  # (H,W,3) uint8, the unaligned reference pose
    frame_canvases: np.ndarray  # (F,H,W,3) uint8
    reference: PoseKeypoints
    frames: list[PoseKeypoints | None]
    alignment: Alignment | None = None
    empty_frames: list[int] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _require_scale_points(pose: PoseKeypoints, what: str) -> None:
    missing = [name for index, name in BODY_NAMES.items() if not pose.body_visible[index]]
    if missing:
        raise PoseError(f"The pose alignment needs both shoulders and both hips, but the {what} does not show "
                        f"the {', '.join(missing)}. Use a {what} where the whole upper body is visible, or set "
                        "alignment to none.")


def pose_video(model: DWPoseModel, reference_bgr: np.ndarray, frames_bgr: Iterable[np.ndarray],
               align: str = ALIGN_MODES[0], missing_person: str = MISSING_PERSON_MODES[0],
               height: int = CANVAS_HEIGHT, width: int = CANVAS_WIDTH,
               progress: Callable[[int], None] | None = None) -> PoseVideo:
    """Extract, align and draw. Images are HxWx3 uint8 BGR, as cv2 reads them in the official script."""
    if align not in ALIGN_MODES or missing_person not in MISSING_PERSON_MODES:
        raise PoseError(f"Unknown option: alignment must be one of {ALIGN_MODES}, missing_person one of "
                        f"{MISSING_PERSON_MODES}.")
    reference = model(reference_bgr).pose
    if reference is None:
        raise PoseError("No person was found in the reference image. UniAnimate animates the person in the "
                        "reference: use a photo showing one person, ideally the whole body, face and hands.")
    poses: list[PoseKeypoints | None] = []
    empty: list[int] = []
    for index, frame in enumerate(frames_bgr):
        found = model(frame, whole_image_fallback=missing_person == "whole image (official)")
        if found.pose is None or found.whole_image:
            empty.append(index)
        if found.pose is None and (index == 0 or missing_person == "error"):
            where = "the first driving frame (the alignment is measured on it)" if index == 0 else f"driving frame {index}"
            raise PoseError(f"No person was found in {where}. Trim the video to frames that show the dancer"
                            + (", or set missing_person to 'black frame'." if index else "."))
        poses.append(found.pose)
        if progress is not None:
            progress(index + 1)
    if not poses:
        raise PoseError("The driving video has no frames: connect at least one frame.")
    warnings: list[str] = []
    alignment = None
    if align != "none":
        _require_scale_points(reference, "reference image")
        _require_scale_points(poses[0], "first driving frame")
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            poses, alignment = align_poses(reference, poses, keep_missing_bones=align == ALIGN_MODES[0])
        if alignment.kept_bones:
            warnings.append(f"Bones not visible in the reference or the first driving frame kept their driving "
                            f"length: {', '.join(alignment.kept_bones)} (OpenPose point pairs).")
    if empty:
        shown = ", ".join(map(str, empty[:12])) + (" ..." if len(empty) > 12 else "")
        what = "were drawn black" if missing_person == "black frame" else "were estimated on the whole image"
        warnings.append(f"No person found in {len(empty)} of {len(poses)} driving frames ({shown}); they {what}.")
    for message in warnings:
        logger.warning("UniAnimate pose: %s", message)
    canvases = np.stack([draw_pose(pose, height, width) for pose in poses])
    return PoseVideo(draw_pose(reference, height, width), canvases, reference, poses, alignment, empty, warnings)
