"""The pose images UniAnimate was trained on, drawn as the official code draws them
(`dwpose/util.py` `draw_body_and_foot`, `draw_handpose`; `run_align_pose.draw_pose`; reference §7).

Body: 19 limbs as filled ellipses (half-axes length/2 and 4 px) in the OpenPose palette, the whole
canvas then dimmed to 60 %, then 20 joints as filled circles of radius 4. Hands: 20 edges 2 px
wide in rainbow colours (HSV hue i/20), joints radius 4. The face is not drawn. The canvas is
768 x 512 (H x W) whatever the source size: normalised coordinates are stretched onto it.

Colour order: the official code draws these (R,G,B)-looking triples into an array that cv2.imwrite
then stores as BGR, and the inference reads the JPEG back as RGB. So the model sees every colour
channel-swapped (limb 0 is blue, hand joints are red). `draw_pose` returns the array exactly as
the official code passes it to imwrite; `model_view` gives what the inference reads back (before
JPEG loss, which cannot be reproduced bit for bit): that is the pack's pose IMAGE.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from .keypoints import PoseKeypoints

CANVAS_HEIGHT, CANVAS_WIDTH = 768, 512  # official draw_pose(..., H=768, W=512)
STICK_HALF_WIDTH = 4
JOINT_RADIUS = 4
LIMB_DIM = 0.6
HAND_LINE = 2
EDGE_EPS = 0.01  # hand points with a pixel coordinate <= this are skipped (official `eps`)

# 1-based OpenPose pairs, then the two feet (ankle -> mid toes).
LIMBS = [(2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13),
         (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (14, 19), (11, 20)]
PALETTE = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85), (170, 255, 255), (255, 255, 0)]
HAND_EDGES = [(0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10), (10, 11),
              (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20)]
HAND_JOINT = (0, 0, 255)


def hue_colour(hue: float) -> tuple[float, float, float]:
    """Fully saturated, full-value HSV -> RGB in 0..255 floats (the standard sextant formula)."""
    sextant = int(hue * 6.0)
    f = hue * 6.0 - sextant
    q, t = 1.0 - f, 1.0 - (1.0 - f)
    rgb = [(1.0, t, 0.0), (q, 1.0, 0.0), (0.0, 1.0, t), (0.0, q, 1.0), (t, 0.0, 1.0), (1.0, 0.0, q)][sextant % 6]
    return tuple(channel * 255 for channel in rgb)


def _finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)


def draw_body(canvas: np.ndarray, pose: PoseKeypoints) -> np.ndarray:
    """Limbs, the 60 % dim, then joints; returns the new (dimmed) canvas."""
    height, width = canvas.shape[:2]
    for colour, (a, b) in zip(PALETTE, LIMBS):
        a, b = a - 1, b - 1
        if not (pose.body_visible[a] and pose.body_visible[b]):
            continue
        xs = pose.body[[a, b], 0] * float(width)
        ys = pose.body[[a, b], 1] * float(height)
        if not _finite(*xs, *ys):
            continue  # a degenerate alignment (0-length bone); the official would raise here
        mid_x, mid_y = np.mean(xs), np.mean(ys)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(mid_x), int(mid_y)), (int(length / 2), STICK_HALF_WIDTH), int(angle),
                                   0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, colour)
    canvas = (canvas * LIMB_DIM).astype(np.uint8)
    for index, colour in enumerate(PALETTE):
        x, y = pose.body[index]
        if pose.body_visible[index] and _finite(x, y):
            cv2.circle(canvas, (int(x * width), int(y * height)), JOINT_RADIUS, colour, thickness=-1)
    return canvas


def draw_hands(canvas: np.ndarray, pose: PoseKeypoints) -> np.ndarray:
    """Both hands in place: edges, then joints."""
    height, width = canvas.shape[:2]
    for hand in pose.hands:
        if not np.isfinite(hand).all():
            continue
        pixels = [(int(x * width), int(y * height)) for x, y in hand]
        for index, (a, b) in enumerate(HAND_EDGES):
            (x1, y1), (x2, y2) = pixels[a], pixels[b]
            if x1 > EDGE_EPS and y1 > EDGE_EPS and x2 > EDGE_EPS and y2 > EDGE_EPS:
                cv2.line(canvas, (x1, y1), (x2, y2), hue_colour(index / float(len(HAND_EDGES))),
                         thickness=HAND_LINE)
        for x, y in pixels:
            if x > EDGE_EPS and y > EDGE_EPS:
                cv2.circle(canvas, (x, y), JOINT_RADIUS, HAND_JOINT, thickness=-1)
    return canvas


def draw_pose(pose: PoseKeypoints | None, height: int = CANVAS_HEIGHT, width: int = CANVAS_WIDTH) -> np.ndarray:
    """One pose image, HxWx3 uint8, as the official passes it to cv2.imwrite (None -> black)."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    if pose is None:
        return canvas
    return draw_hands(draw_body(canvas, pose), pose)


def model_view(canvas: np.ndarray) -> np.ndarray:
    """What the official inference reads back from the saved file: the channels reversed."""
    return np.ascontiguousarray(canvas[..., ::-1])
