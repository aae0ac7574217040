"""DWPose: the two official ONNX files (YOLOX-L person detector + RTMPose `dw-ll_ucoco_384`) in
onnxruntime sessions, checked on load, and one call from a BGR image to the drawn person.

The official files are `yolox_l.onnx` (input 1x3x640x640, output 1x8400x85) and
`dw-ll_ucoco_384.onnx` (input 1x3x384x288, outputs simcc_x 1x133x576 and simcc_y 1x133x768: two
SimCC bins per input pixel). A file of the wrong kind (the two swapped, a body-only RTMPose, a
YOLOX with other classes) is refused by its input and output shapes, with the file named.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime

from ...adapter.errors import PoseError
from .detector import DETECT_SIZE, ROW_WIDTH, anchor_count, detect_people
from .keypoints import WHOLEBODY_POINTS, PoseKeypoints, estimate_wholebody, select_pose, to_openpose

logger = logging.getLogger(__name__)

DETECTOR_FILE, POSE_FILE = "yolox_l.onnx", "dw-ll_ucoco_384.onnx"
WHERE = "models/dwpose/"
SOURCE = "the DWPose release (huggingface.co/yzd-v/DWPose: yolox_l.onnx and dw-ll_ucoco_384.onnx)"


@dataclass
class PersonPose:
    """One image's result: the pose (None when no person was found and there is no fallback),
    the person boxes (K,4) in image pixels, best first, and whether the whole image stood in."""
    pose: PoseKeypoints | None
    boxes: np.ndarray
    whole_image: bool = False


def _dims(value: Sequence) -> list:
    return [d if isinstance(d, int) else None for d in value]


def _open(path: Path, providers: Sequence[str], role: str) -> onnxruntime.InferenceSession:
    if not path.is_file():
        raise PoseError(f"The DWPose {role} {path} does not exist. Put {DETECTOR_FILE} and {POSE_FILE} from "
                        f"{SOURCE} in {WHERE}.")
    try:
        return onnxruntime.InferenceSession(str(path), providers=list(providers))
    except Exception as error:  # noqa: BLE001 - onnxruntime raises several types for a bad file
        raise PoseError(f"Could not load the DWPose {role} {path}: {error}. If the file is damaged or "
                        f"truncated, download it again from {SOURCE}; if a GPU provider failed, try CPU."
                        ) from error


def check_detector(session: onnxruntime.InferenceSession, path: Path) -> None:
    """A YOLOX COCO detector: one image input (640x640 where fixed), one (1, N, 85) output."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = _dims(inputs[0].shape) if len(inputs) == 1 else []
    out = _dims(outputs[0].shape) if outputs else []
    fixed = shape[2:] if len(shape) == 4 else []
    ok = (len(shape) == 4 and all(d in (None, s) for d, s in zip(fixed, DETECT_SIZE))
          and len(out) == 3 and out[2] in (None, ROW_WIDTH) and out[1] in (None, anchor_count()))
    if not ok:
        hint = " It looks like the pose model: swap the two files." if len(outputs) == 2 else ""
        raise PoseError(f"{path.name} is not the YOLOX-L person detector DWPose uses (input {shape}, output "
                        f"{out}; expected input [1, 3, 640, 640] and output [1, 8400, 85]).{hint} Select "
                        f"{DETECTOR_FILE} from {SOURCE}.")


def check_pose_model(session: onnxruntime.InferenceSession, path: Path) -> None:
    """RTMPose whole-body with SimCC heads: a fixed (1,3,h,w) input; (1,133,2w) and (1,133,2h) outputs."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    shape = _dims(inputs[0].shape) if len(inputs) == 1 else []
    outs = [_dims(o.shape) for o in outputs]
    ok = len(shape) == 4 and None not in shape[2:] and len(outs) == 2 and all(len(o) == 3 for o in outs)
    if ok:
        height, width = shape[2:]
        ok = outs[0][1:] == [WHOLEBODY_POINTS, 2 * width] and outs[1][1:] == [WHOLEBODY_POINTS, 2 * height]
    if not ok:
        hint = " It looks like the detector: swap the two files." if len(outs) == 1 else ""
        raise PoseError(f"{path.name} is not the DWPose whole-body model (input {shape}, outputs {outs}; expected "
                        f"input [1, 3, 384, 288] and SimCC outputs [1, 133, 576], [1, 133, 768]).{hint} Select "
                        f"{POSE_FILE} from {SOURCE}.")


class DWPoseModel:
    """The two sessions; `__call__` runs them on one BGR uint8 image (as cv2 reads it)."""

    def __init__(self, detector_path: str | Path, pose_path: str | Path, providers: Sequence[str]):
        self.detector_path, self.pose_path = Path(detector_path), Path(pose_path)
        self.detector = _open(self.detector_path, providers, "detector")
        check_detector(self.detector, self.detector_path)
        self.pose_model = _open(self.pose_path, providers, "pose model")
        check_pose_model(self.pose_model, self.pose_path)
        self.providers_in_use = list(self.pose_model.get_providers())

    def __call__(self, image_bgr: np.ndarray, whole_image_fallback: bool = False) -> PersonPose:
        """The first (most confident) person, as the official DWposeDetector keeps it.

        With no person box the official code estimates the pose on the whole image;
        `whole_image_fallback` does the same, otherwise the pose is None."""
        if image_bgr.ndim != 3 or image_bgr.shape[2] != 3 or image_bgr.dtype != np.uint8:
            raise PoseError(f"DWPose needs an HxWx3 uint8 image, got {image_bgr.dtype} {image_bgr.shape}.")
        boxes = detect_people(self.detector, image_bgr)
        if len(boxes) == 0 and not whole_image_fallback:
            return PersonPose(None, boxes)
        points, scores = estimate_wholebody(self.pose_model, image_bgr, boxes[0] if len(boxes) else None)
        points, scores = to_openpose(points, scores)
        height, width = image_bgr.shape[:2]
        return PersonPose(select_pose(points, scores, width, height), boxes, whole_image=len(boxes) == 0)
