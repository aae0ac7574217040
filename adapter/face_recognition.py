"""Identity scores: ArcFace face similarity per frame, on an insightface pack (no ComfyUI imports).

The face-similarity protocol of the identity-video papers (ID-Animator, MotionCharacter,
ConsisID "FaceSim-Arc"): detect the face, align it with insightface's `norm_crop` to the ArcFace
template at the recognition model's size (112), embed it with the pack's recognition model
(buffalo_l `w600k_r50.onnx`, antelopev2 `glintr100.onnx`) and take the cosine to the reference
face's embedding. `FaceRecognizer` is insightface's `ArcFaceONNX` preprocessing (its input
mean/std rule, RGB planes, float32 NCHW) on an onnxruntime session of our own, so several crops
run as one batch and the provider choice is LoadIDAnimator's.

Scoring rules (docs/scoring.md):
- reference: the most confident face of each reference photo; several photos -> the mean of
  their unit embeddings, renormalised;
- frame: the face chosen by `frame_face` ("largest" by default) among those detected; a frame
  without a face is reported as such (similarity None) and never enters the mean as 0;
- mean score: the mean cosine over the frames with a face; face share: those frames / all frames;
- stability: the mean cosine between the embeddings of consecutive frames with a face (in frame
  order, skipping frames without one): 1.0 = the same face in every frame.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import onnx
import onnxruntime

from .errors import IDAnimatorError, NoFaceError
from .face_detection import (
    DETECTION_SIZES, PACK_FOLDER_HINT, DetectedFace, FaceDetector, detect_faces, norm_crop,
    select_face, to_rgb_uint8,
)

logger = logging.getLogger(__name__)

FRAME_FACE_MODES = ("largest", "most confident", "best match")
KNOWN_RECOGNITION = {"w600k_r50.onnx": "buffalo_l", "glintr100.onnx": "antelopev2",
                     "w600k_mbf.onnx": "buffalo_s / buffalo_sc"}
RECOGNITION_HINT = ("an insightface pack with a recognition model, e.g. buffalo_l (w600k_r50.onnx) or "
                    "antelopev2 (glintr100.onnx), in " + PACK_FOLDER_HINT)
_CPU = "CPUExecutionProvider"


# ----------------------------------------------------------------------------- the model

@functools.lru_cache(maxsize=32)
def _inspect(path: str, mtime_ns: int, size: int) -> tuple[float, float] | None:
    """(input mean, input std) if the ONNX file is a recognition model, else None.

    insightface's router takes a model as ArcFaceONNX for one square NCHW input of side >= 112
    and a multiple of 16 (its 192 landmark models are routed before), with one output. The
    mean/std rule is ArcFaceONNX's: MXNet exports normalise inside the graph (a Sub and a Mul
    among the first 8 nodes) and get raw pixels. Cached per file version: a pack's recognition
    model is 170-250 MB of protobuf to parse.
    """
    try:
        model = onnx.load_model(path, load_external_data=False)
    except Exception:  # any unreadable file is simply "not a recognition model"
        return None
    graph = model.graph
    initialisers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initialisers]  # old exports list weights too
    if len(inputs) != 1 or len(graph.output) != 1:
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or dims[1] != 3 or dims[2] is None or dims[2] != dims[3]:
        return None
    if dims[2] < 112 or dims[2] % 16 or dims[2] == 192:
        return None
    names = [node.name for node in graph.node[:8]]
    mxnet = (any(n.startswith(("Sub", "_minus")) for n in names)
             and any(n.startswith(("Mul", "_mul")) for n in names))
    return (0.0, 1.0) if mxnet else (127.5, 127.5)


def recognition_preprocessing(path: str | Path) -> tuple[float, float] | None:
    """(input mean, input std) of a recognition .onnx; None when the file is not one."""
    stat = Path(path).stat()
    return _inspect(str(path), stat.st_mtime_ns, stat.st_size)


def pack_contents(pack_dir: str | Path) -> list[str]:
    """The .onnx files of a pack folder (one nested level, as the antelopev2 zip unpacks)."""
    pack = Path(pack_dir)
    if not pack.is_dir():
        return []
    files = sorted(p for p in pack.glob("*.onnx") if p.is_file()) or sorted(
        p for p in pack.glob("*/*.onnx") if p.is_file())
    return [f.relative_to(pack).as_posix() for f in files]


def find_recognition_model(pack_dir: str | Path) -> Path:
    """The recognition .onnx of an insightface pack folder (or the path itself if it is an .onnx)."""
    pack = Path(pack_dir).expanduser()
    if pack.is_file():
        if pack.suffix.lower() == ".onnx" and recognition_preprocessing(pack):
            return pack
        raise IDAnimatorError(f"{pack} is not an insightface recognition model; give {RECOGNITION_HINT}.")
    if not pack.is_dir():
        raise IDAnimatorError(f"insightface model folder not found: {pack}. Put {RECOGNITION_HINT}.")
    names = pack_contents(pack)
    # known names first, then the largest file: recognition models are the big ones of a pack
    candidates = sorted((pack / name for name in names),
                        key=lambda p: (p.name not in KNOWN_RECOGNITION, -p.stat().st_size, p.name))
    for path in candidates:
        if recognition_preprocessing(path):
            return path
    raise IDAnimatorError(
        f"The insightface pack {pack.name} has no face recognition model (it holds: "
        f"{', '.join(names) or 'no .onnx file'}). Face similarity needs {RECOGNITION_HINT}; a folder "
        "with only a detector (like the SCRFD one) can detect faces but not compare them.")


class FaceRecognizer:
    """The recognition model of an insightface pack: aligned RGB crops -> raw embeddings.

    Numerically insightface's `ArcFaceONNX.get_feat`: blob = (pixel - mean) * (1 / std) with
    mean = std = 127.5, or 0 and 1 for MXNet exports that normalise inside the graph (a Sub and
    a Mul among their first 8 nodes), RGB planes, float32 NCHW.
    """

    def __init__(self, pack_dir: str | Path, providers: Sequence[str] = (_CPU,)) -> None:
        self.model_file = find_recognition_model(pack_dir)
        self.input_mean, self.input_std = recognition_preprocessing(self.model_file)
        try:
            self.session = onnxruntime.InferenceSession(str(self.model_file), providers=list(providers))
        except Exception as error:
            raise IDAnimatorError(
                f"Could not load the face recognition model {self.model_file} with providers "
                f"{list(providers)}: {error}. If the file is damaged, download the pack again; if a GPU "
                "provider failed, try provider CPU.") from error
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.size = int(model_input.shape[2])  # square: checked by find_recognition_model
        batch = model_input.shape[0]
        self.max_batch = batch if isinstance(batch, int) and batch > 0 else 32
        self.output_name = self.session.get_outputs()[0].name
        logger.info("Face recognition model %s on %s", self.model_file.name, ", ".join(self.providers_in_use))

    @property
    def providers_in_use(self) -> list[str]:
        return list(self.session.get_providers())

    def blob(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB -> (N, 3, S, S) float32, as cv2.dnn.blobFromImages in get_feat."""
        pixels = np.asarray(crops, dtype=np.float32)
        pixels = (pixels - np.float32(self.input_mean)) * np.float32(1.0 / self.input_std)
        return np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))  # NHWC -> NCHW

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops from `crop` -> (N, D) float32 raw (unnormalised) embeddings."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (self.size, self.size, 3):
            raise IDAnimatorError(f"The recognition model wants (N, {self.size}, {self.size}, 3) aligned "
                                  f"crops, got shape {crops.shape}.")
        out = [self.session.run([self.output_name], {self.input_name: self.blob(crops[i:i + self.max_batch])})[0]
               for i in range(0, len(crops), self.max_batch)]
        return np.concatenate(out).reshape(len(crops), -1).astype(np.float32)

    def crop(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """insightface `ArcFaceONNX.get`'s alignment: norm_crop at the model's input size."""
        return norm_crop(image_rgb, face.kps, self.size)

    def __call__(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray:
        """One face of an image -> its raw embedding (D,)."""
        return self.embed(self.crop(image_rgb, face)[None])[0]


class Embedder(Protocol):
    """(RGB image, detected face) -> identity embedding; FaceRecognizer, or any other model."""

    def __call__(self, image_rgb: np.ndarray, face: DetectedFace) -> np.ndarray: ...


# ----------------------------------------------------------------------------- the maths

def unit(x: np.ndarray) -> np.ndarray:
    """x / ||x|| along the last axis (float64: scores must not depend on summation order)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two embeddings."""
    return float(np.dot(unit(a), unit(b)))


def reference_embedding(embeddings: np.ndarray) -> np.ndarray:
    """Several reference photos of one person -> the unit mean of their unit embeddings."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise IDAnimatorError(f"Expected (N, D) reference embeddings with N >= 1, got shape {embeddings.shape}.")
    return unit(unit(embeddings).mean(axis=0))


def stability(embeddings: Sequence[np.ndarray]) -> float:
    """Mean cosine between consecutive embeddings (frames with a face, in order); NaN below two."""
    if len(embeddings) < 2:
        return math.nan
    units = unit(np.stack(embeddings))
    return float(np.mean(np.sum(units[1:] * units[:-1], axis=1)))


# ----------------------------------------------------------------------------- scoring

@dataclass(frozen=True, eq=False)
class FrameScore:
    """One frame: how many faces were found, the one scored (None: no face) and its cosine."""

    frame: int
    faces_found: int
    face: DetectedFace | None
    similarity: float | None  # None when the frame has no face: never 0
    embedding: np.ndarray | None = None  # unit embedding of the scored face


@dataclass(frozen=True, eq=False)
class IdentityScores:
    """Per-frame scores and the three summaries of a video."""

    frames: list[FrameScore]

    @property
    def scored(self) -> list[FrameScore]:
        return [f for f in self.frames if f.similarity is not None]

    @property
    def mean(self) -> float:
        """Mean face similarity over the frames with a face; NaN if none has one."""
        scored = self.scored
        return float(np.mean([f.similarity for f in scored])) if scored else math.nan

    @property
    def face_share(self) -> float:
        """Frames with a face / all frames."""
        return len(self.scored) / len(self.frames) if self.frames else math.nan

    @property
    def stability(self) -> float:
        return stability([f.embedding for f in self.scored])

    @property
    def missing(self) -> list[int]:
        """Frames without a face."""
        return [f.frame for f in self.frames if f.similarity is None]

    def per_frame(self) -> list[float]:
        """Similarity per frame, NaN where the frame has no face (a float list for graphs)."""
        return [math.nan if f.similarity is None else f.similarity for f in self.frames]


Detect = Callable[[np.ndarray], list[DetectedFace]]


def detector_function(detector: FaceDetector, det_sizes: Sequence[int] = DETECTION_SIZES) -> Detect:
    """FaceDetector -> image -> faces, with FaceEncode's detection-size sweep."""
    return lambda image_rgb: detect_faces(detector, image_rgb, det_sizes)


def embed_references(images: Iterable[np.ndarray], detect: Detect, embed: Embedder) -> np.ndarray:
    """Reference photos -> the reference embedding (most confident face of each, as FaceEncode).

    Raises NoFaceError naming the photos without a face (0-based), or when there is no photo.
    """
    embeddings, missing, count = [], [], 0
    for i, image in enumerate(images):
        count += 1
        image_rgb = to_rgb_uint8(image)
        face = select_face(detect(image_rgb), "most confident")
        if face is None:
            missing.append(i)
        else:
            embeddings.append(embed(image_rgb, face))
    if count == 0:
        raise NoFaceError("No reference photo was given: connect at least one photo of the person.")
    if missing:
        raise NoFaceError(
            f"No face found in reference photo(s) {', '.join(map(str, missing))} of {count} (0-based). "
            "Use clear, front-facing photos where the face is at least ~60 px tall, or crop closer.")
    return reference_embedding(np.stack(embeddings))


def _choose(faces: list[DetectedFace], mode: str, image_rgb: np.ndarray, reference: np.ndarray,
            embed: Embedder) -> tuple[DetectedFace, np.ndarray]:
    if mode == "best match":
        embedded = [(face, unit(embed(image_rgb, face))) for face in faces]
        return max(embedded, key=lambda pair: float(np.dot(pair[1], reference)))  # first one on ties
    face = select_face(faces, mode)
    return face, unit(embed(image_rgb, face))


def score_frame(index: int, image: np.ndarray, reference: np.ndarray, detect: Detect, embed: Embedder,
                mode: str = "largest") -> FrameScore:
    """Detect, choose one face (`FRAME_FACE_MODES`), embed and compare with the unit reference."""
    if mode not in FRAME_FACE_MODES:
        raise IDAnimatorError(f"Unknown frame face choice {mode!r}; choose one of {', '.join(FRAME_FACE_MODES)}.")
    image_rgb = to_rgb_uint8(image)
    faces = detect(image_rgb)
    if not faces:
        return FrameScore(index, 0, None, None)
    face, embedding = _choose(faces, mode, image_rgb, reference, embed)
    return FrameScore(index, len(faces), face, float(np.dot(embedding, reference)), embedding)


def score_frames(frames: Iterable[tuple[int, np.ndarray]], reference: np.ndarray, detect: Detect,
                 embed: Embedder, mode: str = "largest",
                 progress: Callable[[], None] | None = None) -> IdentityScores:
    """Every (index, image) of a video scored against the reference embedding."""
    reference = unit(reference)
    scores = []
    for index, image in frames:
        scores.append(score_frame(index, image, reference, detect, embed, mode))
        if progress is not None:
            progress()
    return IdentityScores(scores)
