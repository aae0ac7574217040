"""`score`: identity scores of generated videos, in batch (docs/scoring.md has the protocol).

For each video (a video file, or a folder of frames) and its reference photo(s):
- face similarity per frame: ArcFace cosine with the insightface pack's recognition model, the
  same code as the FaceSimilarity node (adapter.face_recognition); frames without a face are
  reported (null), never scored 0; face share and stability as the node defines them;
- CLIP-I per frame: cosine between the CLIP ViT-H/14 image embeddings (`image_embeds`, after
  the projection) of the reference's official 224 face crop and of the frame (CLIPImageProcessor's
  processing: shortest side 224, bicubic, centre crop 224, CLIP mean/std).

Writes OUT/videos/<id>.json (one per video, written last: a re-run with the same settings skips
it), then OUT/scores.json, OUT/frames.csv, OUT/summary.csv, OUT/summary.md (also printed) and
OUT/plots/<id>.png. Numbers are rounded to 6 decimals, so two runs give identical files.

`--protocol opens2v` scores instead as OpenS2V-Eval does (train/opens2v.py): OUT/opens2v/<id>.json,
OUT/opens2v.json and OUT/opens2v.md.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..adapter.errors import IDAnimatorError, TrainingError
from ..adapter.files import read_jsonl, write_atomic
from .video import VIDEO_SUFFIXES, read_frames

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
PROVIDERS = {"auto": "auto", "cpu": "CPU", "cuda": "CUDA", "rocm": "ROCM", "coreml": "CoreML"}  # --provider


def onnx_providers(choice: str) -> list[str]:
    """A `--provider` choice (PROVIDERS) -> the onnxruntime providers of the detector and recogniser."""
    from ..adapter.face_detection import resolve_providers

    return resolve_providers(PROVIDERS.get(choice, choice))
DECIMALS = 6
FORMAT = 1  # of the per-video JSON; a change recomputes finished videos


@dataclass(frozen=True)
class Item:
    """One generated video: a video file, or a folder of frames (sorted by file name)."""

    id: str
    path: Path

    @property
    def is_frames(self) -> bool:
        return self.path.is_dir()


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_items(inputs: list[Path]) -> list[Item]:
    """Video files and frame folders (folders holding images) under the inputs, ids unique."""
    items: list[Item] = []
    for root in inputs:
        if root.is_file() and root.suffix.lower() in VIDEO_SUFFIXES:
            items.append(Item(root.stem, root))
        elif root.is_dir():
            if _images(root):
                items.append(Item(root.name, root))
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).with_suffix("").as_posix()
                if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES:
                    items.append(Item(rel, path))
                elif path.is_dir() and _images(path):
                    items.append(Item(path.relative_to(root).as_posix(), path))
        else:
            raise TrainingError(f"{root} is neither a folder nor a video ({', '.join(VIDEO_SUFFIXES)}).")
    seen: dict[str, Path] = {}
    for item in items:
        if seen.setdefault(item.id, item.path) != item.path:
            raise TrainingError(f"Two inputs share the id {item.id!r}: {seen[item.id]} and {item.path}; rename one.")
    if not items:
        raise TrainingError(f"No videos or frame folders found in {', '.join(map(str, inputs))}.")
    return items


def reference_photos(references: Path, item_id: str) -> list[Path]:
    """One photo for every video (a file), or per id: REF/<id>.<image> or the images of REF/<id>/."""
    if references.is_file():
        return [references]
    folder = references / item_id
    if folder.is_dir() and _images(folder):
        return _images(folder)
    for suffix in IMAGE_SUFFIXES:
        photo = references / f"{item_id}{suffix}"
        if photo.is_file():
            return [photo]
    raise TrainingError(f"No reference photo for {item_id!r}: put {references / item_id}.png (or .jpg) or a "
                        f"folder {folder}/ of photos of the person, or give one photo for all videos.")


def load_prompts(path: Path | None) -> dict[str, str]:
    """JSONL rows {"id": ..., "prompt" or "caption": ...} (the captions file of training works)."""
    if path is None:
        return {}
    if not path.is_file():
        raise TrainingError(f"The prompts file {path} does not exist; give a JSONL file of "
                            f'{{"id": ..., "prompt": ...}} rows (the captions file of training works).')
    prompts = {}
    for number, row in read_jsonl(path, what="prompts file", numbered=True, torn_last_line=False,
                                  fix='each line is {"id": ..., "prompt": ...}'):
        try:
            prompts[str(row["id"])] = str(row.get("prompt", row.get("caption", "")))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise TrainingError(f"{path}:{number}: expected {{\"id\": ..., \"prompt\": ...}}: {error}") from error
    return prompts


def read_image(path: Path) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    except OSError as error:
        raise TrainingError(f"Cannot read the image {path}: {error}") from error


def frames_of(item: Item, stride: int) -> Iterator[tuple[int, np.ndarray]]:
    if item.is_frames:
        for index, path in enumerate(_images(item.path)):
            if index % stride == 0:
                yield index, read_image(path)
    else:
        for index, frame in read_frames(item.path):
            if index % stride == 0:
                yield index, frame


# ----------------------------------------------------------------------------- CLIP-I

class ClipImage:
    """CLIP ViT-H/14 image embeddings (after the projection), as CLIP-I uses them."""

    def __init__(self, model: Any) -> None:
        """`model`: a transformers CLIPVisionModelWithProjection (the trainer's frozen one works)."""
        import torch

        self.torch = torch
        self.model = model

    @classmethod
    def load(cls, path: Path, device: str) -> "ClipImage":
        """From ComfyUI's clip_vision file (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors)."""
        from .sd15 import load_image_encoder

        return cls(load_image_encoder(path, device=device))

    @staticmethod
    def process(image_rgb: np.ndarray) -> np.ndarray:
        """CLIPImageProcessor's geometry (adapter/clip_image.py): shortest side to 224, centre crop."""
        from ..adapter.clip_image import clip_geometry

        return clip_geometry(image_rgb)

    def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images -> (N, 1024) float64 unit embeddings."""
        from ..adapter.clip_image import clip_pixels

        pixels = clip_pixels(images)
        param = next(self.model.parameters())
        with self.torch.no_grad():
            out = self.model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds
        out = out.double().cpu().numpy()
        return out / np.linalg.norm(out, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- scoring one video

def _round(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), DECIMALS)


def score_item(item: Item, photos: list[Path], prompt: str | None, models: "Models", settings: dict[str, Any],
               progress) -> dict[str, Any]:
    """The per-video record (JSON-ready)."""
    images = [read_image(p) for p in photos]
    try:
        reference = References.of(images, models)
    except IDAnimatorError as error:
        raise TrainingError(f"{item.id}: {error} (reference photos: {', '.join(map(str, photos))})") from error
    rows, summary = score_video(frames_of(item, settings["stride"]), reference, models, settings["frame_face"],
                                lambda: progress.update(1))
    if not rows:
        raise TrainingError(f"{item.path} has no frames to score.")
    return {"id": item.id, "video": str(item.path), "references": [str(p) for p in photos], "prompt": prompt,
            "format": FORMAT, "settings": settings, "frames": rows, "summary": summary}


@dataclass(frozen=True)
class References:
    """What a video is scored against: the ArcFace reference embedding and, with CLIP, the unit
    CLIP-I embedding of the photos' official 224 crops (most confident face, as FaceEncode)."""

    arcface: np.ndarray
    clip: np.ndarray | None

    @classmethod
    def of(cls, images: list[np.ndarray], models: "Models") -> "References":
        """Raises NoFaceError naming the photos without a face."""
        from ..adapter.face_detection import align_face, select_face
        from ..adapter.face_recognition import embed_references, unit

        arcface = embed_references(images, models.detect, models.recognizer)
        clip = None
        if models.clip is not None:
            crops = [align_face(image, select_face(models.detect(image), "most confident").kps) for image in images]
            clip = unit(models.clip.embed(crops).mean(axis=0))
        return cls(arcface, clip)


def score_video(frames: Iterable[tuple[int, np.ndarray]], reference: References, models: "Models",
                frame_face: str = "largest", progress: Callable[[], None] | None = None
                ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(per-frame rows, summary) of (index, RGB uint8 frame) pairs: the numbers of `score`, also
    used by validation while training (train/validation.py)."""
    from ..adapter.face_recognition import score_frame

    rows, embeddings = [], []
    for index, frame in frames:
        score = score_frame(index, frame, reference.arcface, models.detect, models.recognizer, frame_face)
        clip_i = float(models.clip.embed([frame])[0] @ reference.clip) if reference.clip is not None else None
        if score.embedding is not None:
            embeddings.append(score.embedding)
        rows.append({"frame": index, "faces_found": score.faces_found,
                     "box": None if score.face is None else [_round(v) for v in score.face.bbox],
                     "face_similarity": _round(score.similarity), "clip_i": _round(clip_i)})
        if progress is not None:
            progress()
    return rows, (summarise(rows, embeddings) if rows else {})


def summarise(rows: list[dict[str, Any]], embeddings: list[np.ndarray]) -> dict[str, Any]:
    from ..adapter.face_recognition import stability

    faces = [r["face_similarity"] for r in rows if r["face_similarity"] is not None]
    clips = [r["clip_i"] for r in rows if r["clip_i"] is not None]
    return {"frames": len(rows), "frames_with_face": len(faces), "face_share": _round(len(faces) / len(rows)),
            "face_similarity": _round(float(np.mean(faces))) if faces else None,
            "stability": _round(stability(embeddings)), "clip_i": _round(float(np.mean(clips))) if clips else None}


# ----------------------------------------------------------------------------- outputs

def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _table(records: list[dict[str, Any]], overall: dict[str, Any]) -> str:
    def fmt(value: Any) -> str:
        return "n/a" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))

    lines = ["| video | frames | with face | face share | face similarity | stability | CLIP-I |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for record in records + [overall]:
        s = record["summary"]
        lines.append(f"| {record['id']} | {s['frames']} | {s['frames_with_face']} | {fmt(s['face_share'])} | "
                     f"{fmt(s['face_similarity'])} | {fmt(s['stability'])} | {fmt(s['clip_i'])} |")
    return "\n".join(lines) + "\n"


def mean_of_videos(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Each video counts once: the mean of the per-video means (videos without a value left out)."""
    def mean(key: str) -> float | None:
        values = [r["summary"][key] for r in records if r["summary"][key] is not None]
        return _round(float(np.mean(values))) if values else None

    return {"id": "all (mean of videos)", "summary": {
        "frames": sum(r["summary"]["frames"] for r in records),
        "frames_with_face": sum(r["summary"]["frames_with_face"] for r in records),
        **{key: mean(key) for key in ("face_share", "face_similarity", "stability", "clip_i")}}}


def _write(path: Path, text: str) -> None:
    write_atomic(path, text)


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def _plot(record: dict[str, Any], path: Path) -> None:
    from PIL import Image

    from ..adapter.score_plot import Series, plot_scores

    frames = [r["frame"] for r in record["frames"]]
    series = [Series("face similarity", [r["face_similarity"] for r in record["frames"]])]
    if any(r["clip_i"] is not None for r in record["frames"]):
        series.append(Series("CLIP-I", [r["clip_i"] for r in record["frames"]]))
    s = record["summary"]
    title = (f"{record['id']}: face sim {s['face_similarity']} | face in {s['frames_with_face']}/{s['frames']} | "
             f"stability {s['stability']} | CLIP-I {s['clip_i']}")
    missing = [r["frame"] for r in record["frames"] if r["face_similarity"] is None]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(plot_scores(series, title, no_face=missing, frames=frames)).save(path, optimize=False)


def write_outputs(out: Path, records: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    overall = mean_of_videos(records)
    table = _table(records, overall)
    _write(out / "scores.json", json.dumps({"settings": settings, "summary": overall["summary"],
                                            "videos": records}, indent=1) + "\n")
    frame_rows = [["id", "frame", "faces_found", "face_similarity", "clip_i", "x1", "y1", "x2", "y2"]]
    for record in records:
        for r in record["frames"]:
            frame_rows.append([record["id"], r["frame"], r["faces_found"], _cell(r["face_similarity"]),
                               _cell(r["clip_i"]), *(r["box"] or [""] * 4)])
    _write(out / "frames.csv", _csv(frame_rows))
    keys = ["frames", "frames_with_face", "face_share", "face_similarity", "stability", "clip_i"]
    _write(out / "summary.csv", _csv([["id", *keys]] + [[r["id"], *(_cell(r["summary"][k]) for k in keys)]
                                                         for r in records + [overall]]))
    _write(out / "summary.md", table)
    for record in records:
        _plot(record, out / "plots" / f"{record['id']}.png")
    return table


# ----------------------------------------------------------------------------- the command

@dataclass
class Models:
    detect: Any
    recognizer: Any
    clip: ClipImage | None


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="VIDEOS",
                        help="generated videos: video files, folders of them (searched recursively) or folders of "
                             "frames (one video each, frames sorted by file name)")
    parser.add_argument("--references", type=Path, required=True,
                        help="one photo for every video, or a folder with <id>.png (or .jpg) or <id>/ (several "
                             "photos of the person) per video id (its path relative to the input folder)")
    parser.add_argument("--pack", type=Path, required=True,
                        help="insightface pack folder with a detector and a recognition model "
                             "(models/insightface/models/buffalo_l or antelopev2)")
    parser.add_argument("--image-encoder", type=Path,
                        help="CLIP ViT-H/14 clip_vision file (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) for "
                             "CLIP-I; without it CLIP-I is not computed")
    parser.add_argument("--prompts", type=Path, help="JSONL rows {\"id\", \"prompt\"} (or a captions file), "
                                                     "recorded beside the scores")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a re-run resumes it)")
    parser.add_argument("--frame-face", default="largest", choices=["largest", "most confident", "best match"],
                        help="which face of a frame with several is scored (default: largest)")
    parser.add_argument("--stride", type=int, default=1, help="score every Nth frame (default: every frame)")
    parser.add_argument("--provider", default="auto", choices=list(PROVIDERS),
                        type=str.lower, help="onnxruntime provider for detection and recognition")
    parser.add_argument("--device", default="auto", help="torch device for CLIP (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="recompute videos already scored")
    parser.add_argument("--protocol", default="pack", choices=["pack", "opens2v"],
                        help="pack: this pack's scores (every --stride-th frame, misses left out); opens2v: "
                             "OpenS2V-Eval's FaceSim (32 frames, ArcFace and CurricularFace side by side, "
                             "comparable with its public leaderboard; see docs/scoring.md)")
    parser.add_argument("--curricularface", type=Path, metavar="FILE",
                        help="for --protocol opens2v: the CurricularFace IR-101 backbone "
                             "(glint360k_curricular_face_r101_backbone.bin, a torch state dict) or its ONNX export")


def _settings(args: argparse.Namespace, recognizer, detector, clip_path: Path | None) -> dict[str, Any]:
    """What decides the numbers (a finished video is reused only when they are all equal)."""
    def file(path: Path | None) -> dict[str, Any] | None:
        return None if path is None else {"name": Path(path).name, "bytes": Path(path).stat().st_size}

    return {"recognition_model": file(recognizer.model_file), "detector": file(detector.model_file),
            "image_encoder": file(clip_path), "frame_face": args.frame_face, "stride": args.stride,
            "crop": f"insightface norm_crop {recognizer.size}", "input_mean_std": [recognizer.input_mean,
                                                                                  recognizer.input_std]}


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..adapter.face_detection import FaceDetector
    from ..adapter.face_recognition import FaceRecognizer, detector_function

    if args.protocol == "opens2v":
        from .opens2v import run as run_opens2v

        return run_opens2v(args)
    if args.stride < 1:
        raise TrainingError(f"--stride must be at least 1, got {args.stride}.")
    items = find_items(args.inputs)
    prompts = load_prompts(args.prompts)
    photos = {item.id: reference_photos(args.references, item.id) for item in items}  # all checked up front
    providers = onnx_providers(args.provider)
    recognizer = FaceRecognizer(args.pack, providers)
    detector = FaceDetector(args.pack, providers)
    clip = None
    if args.image_encoder is not None:
        import torch

        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        clip = ClipImage.load(args.image_encoder, device)
    else:
        log.warning("No --image-encoder: CLIP-I is not computed.")
    models = Models(detector_function(detector), recognizer, clip)
    settings = _settings(args, recognizer, detector, args.image_encoder)
    records = []
    for item in tqdm(items, desc="videos", unit="video"):
        path = args.out / "videos" / f"{item.id}.json"
        record = json.loads(path.read_text()) if path.is_file() and not args.overwrite else None
        if record is None or record.get("settings") != settings or record.get("format") != FORMAT:
            with tqdm(desc=item.id, unit="frame", leave=False) as progress:
                record = score_item(item, photos[item.id], prompts.get(item.id), models, settings, progress)
            _write(path, json.dumps(record, indent=1) + "\n")
        records.append(record)
    print(write_outputs(args.out, records, settings), end="")
    return 0
