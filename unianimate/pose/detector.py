"""Person boxes from the YOLOX-L ONNX detector that DWPose uses (official `dwpose/onnxdet.py`).

The official route, which this module reproduces in numpy (reference §7, "Detector"):
letterbox the BGR uint8 image into 640x640 (scale r = min(640/h, 640/w), bilinear resize, pasted
top-left on grey 114), feed it as raw 0..255 float32 CHW (no mean/std), decode the stride 8/16/32
grid outputs (xy = (out + cell) * stride, wh = exp(out) * stride), score = objectness x class
probability, boxes back to the image by / r, per-class NMS (IoU 0.45, score > 0.1), then keep
the person class with score > 0.3. Boxes come out best first (NMS order).

Only the person class is run through NMS: the official code runs every class, but classes are
suppressed independently and all but class 0 are dropped afterwards, so the boxes are the same.
The dtypes follow the official ones (float32 network output, float64 boxes after NMS) so the
boxes are equal, not merely close.
"""
from __future__ import annotations

import cv2
import numpy as np

from ...adapter.errors import PoseError

DETECT_SIZE = (640, 640)  # (h, w) of the YOLOX input, fixed in the official code
STRIDES = (8, 16, 32)  # YOLOX heads (no P6)
PAD_VALUE = 114
NMS_IOU = 0.45
CANDIDATE_SCORE = 0.1  # score_thr of the official multiclass NMS
PERSON_SCORE = 0.3  # boxes kept after NMS
PERSON_CLASS = 0  # COCO "person"
ROW_WIDTH = 85  # 4 box + 1 objectness + 80 COCO classes per anchor


def anchor_count(size: tuple[int, int] = DETECT_SIZE) -> int:
    """Rows of the YOLOX output for an input size: one per cell of the three grids (8400 at 640)."""
    return sum((size[0] // s) * (size[1] // s) for s in STRIDES)


def letterbox_size(height: int, width: int, size: tuple[int, int] = DETECT_SIZE) -> tuple[float, int, int]:
    """The resize ratio r and the resized (w, h) inside the letterbox (truncated, as the official)."""
    ratio = min(size[0] / height, size[1] / width)
    return ratio, int(width * ratio), int(height * ratio)


def letterbox(image_bgr: np.ndarray, size: tuple[int, int] = DETECT_SIZE) -> tuple[np.ndarray, float]:
    """HxWx3 uint8 -> (1,3,h,w) float32 network input and the resize ratio r."""
    ratio, new_w, new_h = letterbox_size(*image_bgr.shape[:2], size)
    canvas = np.full((size[0], size[1], 3), PAD_VALUE, dtype=np.uint8)
    canvas[:new_h, :new_w] = cv2.resize(image_bgr, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    chw = np.ascontiguousarray(canvas.transpose(2, 0, 1), dtype=np.float32)
    return chw[None], ratio


def grid_cells(size: tuple[int, int] = DETECT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Per anchor row: its (x, y) cell index (N,2) and its stride (N,1), in the network's row order
    (stride 8 first, row-major within each grid)."""
    cells, strides = [], []
    for stride in STRIDES:
        rows, cols = size[0] // stride, size[1] // stride
        ys, xs = np.divmod(np.arange(rows * cols), cols)
        cells.append(np.stack([xs, ys], axis=1))
        strides.append(np.full((rows * cols, 1), stride))
    return np.concatenate(cells), np.concatenate(strides)


def decode(raw: np.ndarray, size: tuple[int, int] = DETECT_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """YOLOX head output (N,85) -> boxes (N,4) as x1,y1,x2,y2 in input pixels, scores (N,80).

    Each step is stored back as float32, as the official in-place decode does."""
    cells, strides = grid_cells(size)
    rows = np.array(raw, dtype=np.float32, copy=True)
    rows[:, :2] = (rows[:, :2] + cells) * strides
    rows[:, 2:4] = np.exp(rows[:, 2:4]) * strides
    centre, extent = rows[:, :2], rows[:, 2:4]
    boxes = np.concatenate([centre - extent / 2.0, centre + extent / 2.0], axis=1).astype(np.float32)
    scores = rows[:, 4:5] * rows[:, 5:]
    return boxes, scores


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float = NMS_IOU) -> list[int]:
    """Greedy NMS, best score first; areas count pixels inclusively (+1), as the official does."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(scores)[::-1]
    keep: list[int] = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        inter_w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]) + 1)
        inter_h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]) + 1)
        inter = inter_w * inter_h
        iou = inter / (areas[best] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return keep


def person_boxes(raw: np.ndarray, ratio: float, size: tuple[int, int] = DETECT_SIZE) -> np.ndarray:
    """YOLOX output rows (N,85) of one image -> person boxes (K,4) float64 in image pixels, best first."""
    boxes, scores = decode(raw, size)
    boxes /= ratio  # in place, on float32, as the official does
    person = scores[:, PERSON_CLASS]
    candidates = person > CANDIDATE_SCORE
    if not candidates.any():
        return np.zeros((0, 4))
    kept_boxes, kept_scores = boxes[candidates], person[candidates]
    keep = nms(kept_boxes, kept_scores)
    chosen = np.asarray(keep)[kept_scores[keep].astype(np.float64) > PERSON_SCORE]  # compared in float64, as the official's detections are
    return kept_boxes[chosen].astype(np.float64)


def detect_people(session, image_bgr: np.ndarray) -> np.ndarray:
    """Run the detector session on one BGR uint8 image -> person boxes (K,4) float64, best first."""
    if min(letterbox_size(*image_bgr.shape[:2])[1:]) < 1:
        return np.zeros((0, 4))  # a sliver (e.g. 1 x 2000 px) letterboxes to nothing: no person
    batch, ratio = letterbox(image_bgr)
    raw = session.run(None, {session.get_inputs()[0].name: batch})[0]
    if raw.ndim != 3 or raw.shape[0] != 1 or raw.shape[2] != ROW_WIDTH:
        raise PoseError(f"The detector returned shape {tuple(raw.shape)}, expected (1, N, {ROW_WIDTH}): load the "
                        f"official yolox_l.onnx in IDA_LoadDWPose.")
    return person_boxes(raw[0], ratio)
