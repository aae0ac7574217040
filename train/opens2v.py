"""`score --protocol opens2v`: OpenS2V-Eval's FaceSim (OpenS2V-Nexus `eval/get_facesim.py`), reproduced.

The public leaderboard (OpenS2V-Eval, Human-Domain) ranks identity by FaceSim, the CurricularFace
score of this protocol, per video:
1. 32 frames at `np.linspace(0, frames - 1, 32)` truncated to integers (repeats in short videos);
2. in each frame (and in the reference photo) the detector of an insightface pack at 320x320,
   threshold 0.5; the **largest** box (by area; the last of equal ones);
3. no face: the image is padded by 25% of its height above and below and 25% of its width left
   and right with grey 128, detected again, and the keypoints moved back; still none: a miss;
4. ArcFace: the pack's recognition model on the face as found (in the padded image after a retry);
   CurricularFace: `norm_crop` of the unpadded image at 224, resized to 112 (see adapter/curricularface.py);
5. each frame's cosine to the reference, clamped at 0;
6. the video's score: the mean over the frames with a face, where CurricularFace leaves out the
   frames whose clamped cosine is 0 and ArcFace keeps them (the released code's behaviour, kept
   to match its numbers); 0 when no frame has a face. The leaderboard shows it as a percentage.
Beside these we report the face-detection rate and, per model, the mean with misses counted as 0
and the mean over the frames with a face (zeros kept), so other papers' conventions can be read off.
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter.errors import TrainingError

log = logging.getLogger(__name__)

FRAMES = 32
DET_SIZE = 320
PAD = 1.25
GREY = 128
CROP = 224
FORMAT = 1


def sample_indices(total: int, frames: int = FRAMES) -> list[int]:
    """OpenS2V's frame choice: linspace(0, total - 1, frames) cast to int (truncation)."""
    return np.linspace(0, total - 1, frames, dtype=int).tolist()


def pad_grey(image: np.ndarray, scale: float = PAD) -> tuple[np.ndarray, tuple[int, int]]:
    """The image with int(h * (scale - 1)) grey rows above and below, int(w * (scale - 1)) columns
    left and right; and (left, top), the shift of its content."""
    height, width = image.shape[:2]
    top, left = int(height * (scale - 1.0)), int(width * (scale - 1.0))
    padded = np.full((height + 2 * top, width + 2 * left, 3), GREY, dtype=np.uint8)
    padded[top:top + height, left:left + width] = image
    return padded, (left, top)


@dataclass
class Found:
    """A face as the protocol finds it: its ArcFace embedding (raw) and its 224 crop."""

    arcface: np.ndarray
    crop: np.ndarray
    padded: bool


def _largest(faces: list) -> Any:
    """The largest box; of equal ones the last (the released code sorts by area and takes [-1])."""
    def area(face) -> float:
        x1, y1, x2, y2 = face.bbox
        return float((x2 - x1) * (y2 - y1))

    return max(reversed(faces), key=area)


def find_face(image_rgb: np.ndarray, detector, recognizer) -> Found | None:
    from ..adapter.face_detection import norm_crop

    padded, faces, shift = False, detector.detect(image_rgb, DET_SIZE), (0, 0)
    searched = image_rgb
    if not faces:
        searched, shift = pad_grey(image_rgb)
        faces, padded = detector.detect(searched, DET_SIZE), True
        if not faces:
            return None
    face = _largest(faces)
    arcface = recognizer(searched, face)
    kps = np.asarray(face.kps, np.float32) - np.asarray(shift, np.float32)
    return Found(arcface, norm_crop(image_rgb, kps, CROP), padded)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / max(np.linalg.norm(x), 1e-12)


@dataclass
class Reference:
    arcface: np.ndarray
    curricularface: np.ndarray


def reference(image_rgb: np.ndarray, detector, recognizer, curricularface, source: str) -> Reference:
    found = find_face(image_rgb, detector, recognizer)
    if found is None:
        raise TrainingError(f"No face in the reference photo {source}, even padded: give a photo with a visible face.")
    return Reference(_unit(found.arcface), _unit(curricularface.embed(found.crop[None])[0]))


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else 0.0


def score_frame(frame: np.ndarray, ref: Reference, detector, recognizer, curricularface) -> dict[str, Any]:
    found = find_face(frame, detector, recognizer)
    if found is None:
        return {"face": False, "padded": None, "arcface": None, "curricularface": None}
    cur = max(0.0, float(_unit(curricularface.embed(found.crop[None])[0]) @ ref.curricularface))
    arc = max(0.0, float(_unit(found.arcface) @ ref.arcface))
    return {"face": True, "padded": found.padded, "arcface": arc, "curricularface": cur}


def score_frames(indices: list[int], frames: dict[int, np.ndarray], ref: Reference, detector, recognizer,
                 curricularface) -> dict[str, Any]:
    """Per-sample rows and the video's numbers (see the module docstring). A frame sampled twice
    (short videos) is scored once and counted twice, as the released code counts it."""
    scored = {index: score_frame(frames[index], ref, detector, recognizer, curricularface) for index in set(indices)}
    rows = [{"frame": index, **scored[index]} for index in indices]
    detected = [row for row in rows if row["face"]]
    summary: dict[str, Any] = {"frames": len(rows), "frames_with_face": len(detected),
                               "detection_rate": len(detected) / len(rows),
                               "padded_retries_found": sum(1 for row in detected if row["padded"])}
    for model in ("curricularface", "arcface"):
        scores = [row[model] for row in detected]
        kept = [s for s in scores if s != 0.0] if model == "curricularface" else scores
        summary[f"{model}_opens2v"] = _mean(kept)
        summary[f"{model}_misses_as_0"] = sum(scores) / len(rows)
        summary[f"{model}_detected_mean"] = _mean(scores) if scores else None
    return {"frames": rows, "summary": summary}


def video_frames(item, indices: list[int]) -> dict[int, np.ndarray]:
    from .score import _images, read_image
    from .video import read_frames

    if item.is_frames:
        paths = _images(item.path)
        return {i: read_image(paths[i]) for i in set(indices)}
    return dict(read_frames(item.path, sorted(set(indices))))


def frame_total(item) -> int:
    from .score import _images
    from .video import frame_count

    total = len(_images(item.path)) if item.is_frames else frame_count(item.path)
    if total == 0:
        raise TrainingError(f"{item.path} has no frames to score.")
    return total


# ----------------------------------------------------------------------------- the command

COLUMNS = [("frames", "frames"), ("frames_with_face", "with face"), ("detection_rate", "detection rate"),
           ("curricularface_opens2v", "FaceSim-Cur (OpenS2V)"), ("curricularface_misses_as_0", "Cur, misses = 0"),
           ("curricularface_detected_mean", "Cur, detected"), ("arcface_opens2v", "FaceSim-Arc (OpenS2V)"),
           ("arcface_misses_as_0", "Arc, misses = 0"), ("arcface_detected_mean", "Arc, detected")]


def _fmt(value: Any) -> str:
    return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))


def table(records: list[dict[str, Any]], overall: dict[str, Any]) -> str:
    lines = ["| video | " + " | ".join(title for _, title in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for record in records + [overall]:
        lines.append(f"| {record['id']} | " + " | ".join(_fmt(record["summary"][k]) for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def overall_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each video counts once (the leaderboard averages videos); frame counts are totals."""
    summary: dict[str, Any] = {"frames": sum(r["summary"]["frames"] for r in records),
                               "frames_with_face": sum(r["summary"]["frames_with_face"] for r in records)}
    for key, _ in COLUMNS[2:]:
        values = [r["summary"][key] for r in records if r["summary"][key] is not None]
        summary[key] = float(np.mean(values)) if values else None
    return {"id": "all (mean of videos)", "summary": summary}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..adapter.curricularface import CurricularFace
    from ..adapter.face_detection import FaceDetector
    from ..adapter.face_recognition import FaceRecognizer
    from .score import _write, find_items, onnx_providers, read_image, reference_photos

    if args.curricularface is None:
        raise TrainingError("--protocol opens2v needs --curricularface FILE: the CurricularFace IR-101 backbone "
                            "(glint360k_curricular_face_r101_backbone.bin from OpenS2V-Weight) or its ONNX export.")
    items = find_items(args.inputs)
    photos = {item.id: reference_photos(args.references, item.id)[0] for item in items}  # OpenS2V: one photo
    providers = onnx_providers(args.provider)
    detector, recognizer = FaceDetector(args.pack, providers), FaceRecognizer(args.pack, providers)
    device = "cpu" if args.device == "auto" and not _cuda() else ("cuda" if args.device == "auto" else args.device)
    curricularface = CurricularFace(args.curricularface, device, providers)
    settings = {"protocol": "opens2v", "format": FORMAT, "frames": FRAMES, "det_size": DET_SIZE,
                "detector": detector.model_file.name, "arcface": recognizer.model_file.name,
                "curricularface": {"name": Path(args.curricularface).name,
                                   "bytes": Path(args.curricularface).stat().st_size}}
    records = []
    for item in tqdm(items, desc="videos (OpenS2V FaceSim)", unit="video"):
        path = args.out / "opens2v" / f"{item.id}.json"
        record = json.loads(path.read_text()) if path.is_file() and not args.overwrite else None
        if record is None or record.get("settings") != settings:
            ref = reference(read_image(photos[item.id]), detector, recognizer, curricularface, str(photos[item.id]))
            indices = sample_indices(frame_total(item))
            scored = score_frames(indices, video_frames(item, indices), ref, detector, recognizer, curricularface)
            record = {"id": item.id, "video": str(item.path), "reference": str(photos[item.id]),
                      "settings": settings, **scored}
            _write(path, json.dumps(record, indent=1) + "\n")
        records.append(record)
    overall = overall_of(records)
    text = table(records, overall)
    _write(args.out / "opens2v.json", json.dumps({"settings": settings, "summary": overall["summary"],
                                                  "videos": records}, indent=1) + "\n")
    _write(args.out / "opens2v.md", text)
    print(text, end="")
    cur = overall["summary"]["curricularface_opens2v"]
    print(f"OpenS2V-Eval FaceSim (CurricularFace): {100 * cur:.2f} on the leaderboard's scale "
          f"(ID-Animator's row, Human-Domain v1.1: 31.56); see docs/scoring.md")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
