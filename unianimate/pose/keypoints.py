"""Whole-body keypoints of one person from the RTMPose ONNX model `dw-ll_ucoco_384` (DWPose).

Official route (`dwpose/onnxpose.py`, `wholebody.py`, `run_align_pose.DWposeDetector`; reference §7):
- crop: box centre, box size x 1.25 widened to the model's w/h aspect, an affine warp without
  rotation (bilinear, black border) to the model input (288x384 for dw-ll_ucoco_384); with no
  box, the whole image is the box;
- normalise the BGR channels as they are with the ImageNet RGB mean/std (the official quirk);
- SimCC: per keypoint the argmax of each axis / 2 (split ratio), score = min of the two maxima,
  location -1 where the score <= 0, mapped back by kp / input * scale + centre - scale / 2;
- 133 COCO-WholeBody points + a neck (mean of the shoulders, score 1 iff both > 0.3) inserted at
  17, the body remapped to OpenPose-18 order;
- the first (best) person only, normalised by the image size; points scoring < 0.3 become
  (-1, -1); a body point is drawn iff its score > 0.3; two foot points (mid big/small toe).
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BOX_PADDING = 1.25
PIXEL_MEAN = np.array([123.675, 116.28, 103.53])  # ImageNet RGB mean, applied to BGR as in the official
PIXEL_STD = np.array([58.395, 57.12, 57.375])
SIMCC_SPLIT = 2.0  # SimCC bins per input pixel
WHOLEBODY_POINTS = 133
VISIBLE = 0.3  # score above which a point counts (official, everywhere)

# COCO-WholeBody body points (after the neck is inserted at 17) -> OpenPose-18 slots.
_OPENPOSE_SLOTS = [1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17]
_COCO_SOURCES = [17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3]
BODY, FEET, FACE, LEFT_HAND, RIGHT_HAND = slice(0, 18), slice(18, 24), slice(24, 92), slice(92, 113), slice(113, 134)


@dataclass
class PoseKeypoints:
    """One person in normalised image coordinates (x / W, y / H); missing points are (-1, -1).

    body: (20,2) OpenPose-18 body + 18 = left foot (mid toes), 19 = right foot;
    body_visible: (20,) which body points the drawing shows; hands: (2,21,2), left then right;
    face: (68,2). Arrays are float64 and owned (the alignment changes them in place)."""
    body: np.ndarray
    body_visible: np.ndarray
    hands: np.ndarray
    face: np.ndarray

    def copy(self) -> "PoseKeypoints":
        return PoseKeypoints(self.body.copy(), self.body_visible.copy(), self.hands.copy(), self.face.copy())


def box_centre_scale(box: np.ndarray, aspect: float) -> tuple[np.ndarray, np.ndarray]:
    """x1,y1,x2,y2 -> centre (2,) and padded scale (2,) widened to `aspect` = w / h."""
    box = np.asarray(box)
    centre = np.array([box[0] + box[2], box[1] + box[3]]) * 0.5
    width, height = (box[2] - box[0]) * BOX_PADDING, (box[3] - box[1]) * BOX_PADDING
    if width > height * aspect:
        return centre, np.array([width, width / aspect])
    return centre, np.array([height * aspect, height])


def crop_matrix(centre: np.ndarray, scale: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """2x3 affine taking the scaled box to the model input (no rotation), from three point pairs
    (centre, the box's top-middle, a third point a quarter turn about the second), in float32."""
    def third(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d = a - b
        return b + np.array([-d[1], d[0]], dtype=a.dtype)

    src = np.zeros((3, 2), dtype=np.float32)
    src[0] = centre
    src[1] = centre + np.array([0.0, -0.5 * scale[0]])
    src[2] = third(src[0], src[1])
    dst = np.zeros((3, 2), dtype=np.float32)
    dst[0] = [out_w * 0.5, out_h * 0.5]
    dst[1] = np.array([out_w * 0.5, out_h * 0.5]) + np.array([0.0, -0.5 * out_w])
    dst[2] = third(dst[0], dst[1])
    return cv2.getAffineTransform(src, dst)


def crop_input(image_bgr: np.ndarray, box: np.ndarray, out_w: int, out_h: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model input (1,3,h,w) float32 for one box, with the box centre and scale."""
    centre, scale = box_centre_scale(box, out_w / out_h)
    warped = cv2.warpAffine(image_bgr, crop_matrix(centre, scale, out_w, out_h), (int(out_w), int(out_h)),
                            flags=cv2.INTER_LINEAR)
    normalised = (warped - PIXEL_MEAN) / PIXEL_STD  # float64, cast once below, as onnxruntime does
    return normalised.transpose(2, 0, 1)[None].astype(np.float32), centre, scale


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K,Wx), (K,Wy) -> locations (K,2) in input pixels (float32) and scores (K,) (float32)."""
    max_x, max_y = simcc_x.max(axis=1), simcc_y.max(axis=1)
    locations = np.stack([simcc_x.argmax(axis=1), simcc_y.argmax(axis=1)], axis=-1).astype(np.float32)
    scores = np.where(max_x > max_y, max_y, max_x)
    locations[scores <= 0.0] = -1
    locations /= SIMCC_SPLIT
    return locations, scores


def estimate_wholebody(session, image_bgr: np.ndarray, box: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """133 keypoints (133,2) in image pixels (float64) and scores (133,) for one box (None = whole image)."""
    out_h, out_w = session.get_inputs()[0].shape[2:]
    if box is None:
        box = np.array([0, 0, image_bgr.shape[1], image_bgr.shape[0]])
    batch, centre, scale = crop_input(image_bgr, box, out_w, out_h)
    names = [output.name for output in session.get_outputs()]
    simcc_x, simcc_y = session.run(names, {session.get_inputs()[0].name: batch})
    locations, scores = simcc_decode(simcc_x[0], simcc_y[0])
    points = locations / np.array([out_w, out_h]) * scale + centre - scale / 2
    return points, scores


def to_openpose(points: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """133 COCO-WholeBody points -> the official 134 (neck at 17, body in OpenPose-18 order)."""
    info = np.concatenate([points, scores[:, None]], axis=-1)
    neck = np.mean(info[[5, 6]], axis=0)
    neck[2] = float(info[5, 2] > VISIBLE and info[6, 2] > VISIBLE)
    info = np.insert(info, 17, neck, axis=0)
    info[_OPENPOSE_SLOTS] = info[_COCO_SOURCES]
    return info[:, :2], info[:, 2]


def select_pose(points: np.ndarray, scores: np.ndarray, width: int, height: int) -> PoseKeypoints:
    """Official 134 points in pixels -> the drawn person (normalised; weak points (-1, -1))."""
    points = points / np.array([float(width), float(height)])
    points[scores < VISIBLE] = -1
    visible = scores > VISIBLE
    body = points[:20].copy()
    for slot, (a, b) in ((18, (18, 19)), (19, (21, 22))):  # feet: mid of big and small toe
        present = -1 not in points[a] and -1 not in points[b]
        body[slot] = (points[a] + points[b]) / 2 if present else -1.0
    body_visible = np.concatenate([visible[:18], [visible[18] and visible[19], visible[21] and visible[22]]])
    hands = np.stack([points[LEFT_HAND], points[RIGHT_HAND]])
    return PoseKeypoints(body, body_visible, hands, points[FACE].copy())
