"""Face detection and the official ID-Animator face crop, on insightface 2.1 (no ComfyUI imports).

Official route (spec §4.1, `infer.py` / `app.py`): insightface `buffalo_l` on the **BGR** uint8
image, the 5 keypoints of `faces[0]` (detections sorted by score, so the most confident face),
`face_align.norm_crop(img, kps, 112)` (ArcFace template, similarity transform, bilinear, black
border), BGR->RGB, then PIL resize to 224x224 (bicubic). Only the detector of the pack is needed
for that, so `FaceDetector` loads the detection model alone and never the recognition,
landmark or gender/age models beside it.

Detection sizes: the official code detects at `det_size=(320, 320)`, so `detect_and_align` tries
320 first (keypoints, hence crops, differ slightly between sizes) and only when nothing is found
sweeps 640 down to 160: larger sizes find small faces in group photos, smaller ones faces that
fill the frame. Models with a fixed input size (e.g. a 640x640 export) run at that size only.
"""
from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import onnx
import onnxruntime
import torch
from PIL import Image

from .errors import IDAnimatorError

logger = logging.getLogger(__name__)

ALIGN_SIZE = 112  # official: norm_crop(..., 112), the ArcFace template size
CROP_SIZE = 224  # official: PIL resize of the 112 crop to CLIP's input size
MAX_DETECT_SIDE = 2048  # larger images are downscaled for detection only (memory, speed)
CONVERT_ROWS = 256  # rows per slice when converting to uint8 (bounds the temporary's size)
MIN_DETECT_SIDE = 8  # below this many pixels (after letterboxing) no face can be found
PACK_FOLDER_HINT = "ComfyUI/models/insightface/models/<pack>/ (e.g. buffalo_l with det_10g.onnx)"

SELECT_MODES = ("most confident", "largest", "index")
PROVIDER_CHOICES = ("auto", "CPU", "CUDA", "ROCM", "CoreML")

_CPU = "CPUExecutionProvider"
# onnxruntime names per user-facing choice; ROCm builds after 1.22 ship MIGraphX instead.
_PROVIDER_NAMES = {
    "CPU": (_CPU,),
    "CUDA": ("CUDAExecutionProvider",),
    "ROCM": ("ROCMExecutionProvider", "MIGraphXExecutionProvider"),
    "CoreML": ("CoreMLExecutionProvider",),
}
_AUTO_ORDER = ("CUDA", "ROCM", "CoreML")
_INSTALL_HINTS = {
    "CUDA": "uninstall `onnxruntime` and install `onnxruntime-gpu` "
            "(pip uninstall -y onnxruntime && pip install onnxruntime-gpu)",
    "ROCM": "uninstall `onnxruntime` and install AMD's ROCm build of onnxruntime "
            "(`onnxruntime-rocm` or `onnxruntime-migraphx`)",
    "CoreML": "use the standard `onnxruntime` wheel on macOS, which includes CoreML",
}

# Detection models by name in the insightface packs: det_10g / det_2.5g / det_500m (buffalo_*),
# scrfd_10g_bnkps (antelopev2); RetinaFace exports are named after the architecture.
_DETECTOR_NAME = re.compile(r"^(det[_\-.]|.*scrfd|.*retinaface)", re.IGNORECASE)
# SCRFD / RetinaFace heads: scores, boxes (+ keypoints) at 3 or 5 strides.
_DETECTOR_OUTPUTS = {6: False, 9: True, 10: False, 15: True}  # output count -> has keypoints


# ----------------------------------------------------------------------------- providers

def available_providers() -> list[str]:
    """Execution providers of the installed onnxruntime, e.g. ['CPUExecutionProvider']."""
    return list(onnxruntime.get_available_providers())


def resolve_providers(choice: str) -> list[str]:
    """onnxruntime providers for the node's `provider` choice; GPU choices keep CPU as fallback."""
    key = {c.lower(): c for c in PROVIDER_CHOICES}.get(str(choice).strip().lower())
    if key is None:
        raise IDAnimatorError(f"Unknown face detection provider {choice!r}; "
                              f"choose one of {', '.join(PROVIDER_CHOICES)}.")
    available = available_providers()
    if key == "CPU":
        return [_CPU]
    candidates = _AUTO_ORDER if key == "auto" else (key,)
    for candidate in candidates:
        for name in _PROVIDER_NAMES[candidate]:
            if name in available:
                return [name, _CPU]
    if key == "auto":
        return [_CPU]
    raise IDAnimatorError(
        f"Face detection provider {key} is not available in this onnxruntime "
        f"({onnxruntime.__version__}), which has: {', '.join(available)}. "
        f"To use {key}, {_INSTALL_HINTS[key]}; see README \"Face detection on the GPU\". "
        f"Or pick provider CPU (detection runs once per reference image, so CPU is fine).")


# ----------------------------------------------------------------------------- images

def to_rgb_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Any still image (grey, grey+alpha, RGB, RGBA; uint8, uint16 or float in [0, 1]) -> HxWx3 uint8.

    Takes a numpy array or one photo of a ComfyUI IMAGE batch (a tensor of any float dtype).
    Alpha is dropped, not composited: the official code reads photos with cv2.imread, which
    ignores alpha, and ComfyUI's LoadImage already splits alpha off into a MASK.
    Floats are ComfyUI IMAGE values in [0, 1], rounded (not truncated) so uint8 -> float -> uint8
    is lossless; uint16 (16-bit PNG) is rounded to the nearest 8-bit value.
    """
    image = _as_array(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise IDAnimatorError(
            f"Expected one image of shape HxW or HxWxC with C in 1..4, got shape {image.shape}"
            + (" (a batch? pass the images one at a time)" if image.ndim == 4 else "") + ".")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise IDAnimatorError(f"The image is empty (shape {image.shape}).")
    channels = image.shape[2]
    colour = image[:, :, :1] if channels <= 2 else image[:, :, :3]  # drop alpha
    colour = _to_uint8(colour)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    return np.ascontiguousarray(colour)


def _as_array(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view (copy only where needed) of an array or tensor, in native byte order."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.float()  # numpy has no bfloat16 / float8: one photo, so the copy is small
        try:
            image = image.numpy()
        except TypeError as error:  # e.g. quantized tensors
            raise IDAnimatorError(f"Unsupported image tensor dtype {image.dtype}; expected a float "
                                  "IMAGE in [0, 1] (or uint8).") from error
    image = np.asarray(image)
    if not image.dtype.isnative:  # e.g. big-endian 16-bit samples as some readers return them
        image = image.astype(image.dtype.newbyteorder("="))
    return image


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """uint8 unchanged; uint16 and [0, 1] floats rounded to uint8; anything else is an error."""
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        # round(x * 255 / 65535) in integers
        return _by_rows(image, lambda rows: (rows.astype(np.uint32) * 255 + 32767) // 65535)
    if np.issubdtype(image.dtype, np.floating):
        low, high = float(image.min()), float(image.max())  # NaN/inf propagate to min/max
        if not (np.isfinite(low) and np.isfinite(high)):
            raise IDAnimatorError(
                "The image contains NaN or infinite values; check the node that produced it "
                "(e.g. a VAE decode in fp16 that overflowed).")
        if high > 2.0 or low < -1.0:
            raise IDAnimatorError(
                f"Float image values span [{low:.3g}, {high:.3g}]; expected ComfyUI's [0, 1] range. "
                "Scale it to [0, 1] first (a [0, 255] float image is not accepted).")
        return _by_rows(image, _float_rows_to_levels)
    raise IDAnimatorError(
        f"Unsupported image dtype {image.dtype}; expected uint8, uint16 or float in [0, 1].")


def _float_rows_to_levels(rows: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> rounded, clipped 0..255 levels (float32)."""
    scaled = np.multiply(rows, 255.0, dtype=np.float32)
    np.rint(scaled, out=scaled)
    return np.clip(scaled, 0.0, 255.0, out=scaled)


def _by_rows(image: np.ndarray, to_levels: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 image converted CONVERT_ROWS rows at a time: an 8000x8000 IMAGE would otherwise need
    a full-size float32 (or uint32) temporary, 768 MB, on top of the uint8 result."""
    out = np.empty(image.shape, dtype=np.uint8)
    for top in range(0, image.shape[0], CONVERT_ROWS):
        out[top:top + CONVERT_ROWS] = to_levels(image[top:top + CONVERT_ROWS])
    return out


def _downscale_for_detection(image_rgb: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Image with its longer side at most `max_side`, and the factor applied (<= 1)."""
    height, width = image_rgb.shape[:2]
    longest = max(height, width)
    if longest <= max_side:
        return image_rgb, 1.0
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
    return cv2.resize(image_rgb, size, interpolation=cv2.INTER_AREA), scale


# ----------------------------------------------------------------------------- faces

@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detection in image pixels: box (x1, y1, x2, y2), 5 keypoints (eyes, nose, mouth corners)."""

    bbox: np.ndarray  # (4,) float32
    kps: np.ndarray  # (5, 2) float32, x y
    score: float

    @property
    def area(self) -> float:
        """Box area in pixels²."""
        x1, y1, x2, y2 = (float(v) for v in self.bbox)
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)

    @property
    def centre_x(self) -> float:
        """Horizontal centre of the box: the order of the "index" selection mode."""
        return float(self.bbox[0] + self.bbox[2]) / 2.0

    def scaled(self, factor: float) -> "DetectedFace":
        """The same face in an image resized by `factor`."""
        return _make_face(self.bbox * factor, self.kps * factor, self.score)


def _make_face(bbox: np.ndarray, kps: np.ndarray, score: float) -> DetectedFace:
    """DetectedFace with private, read-only float32 arrays (the dataclass is frozen)."""
    bbox = np.array(bbox, dtype=np.float32).reshape(4)
    kps = np.array(kps, dtype=np.float32).reshape(5, 2)
    bbox.setflags(write=False)
    kps.setflags(write=False)
    return DetectedFace(bbox=bbox, kps=kps, score=float(score))


@dataclass(frozen=True, eq=False)
class AlignedFace:
    """The official 224x224 RGB face crop, the face it came from and how many faces were found."""

    crop: np.ndarray  # (224, 224, 3) uint8 RGB
    face: DetectedFace  # in the input image's pixels
    faces_found: int


# ----------------------------------------------------------------------------- detector

def _onnx_signature(path: Path) -> tuple[int, int] | None:
    """(inputs, outputs) of an ONNX graph without running it; None if it does not parse."""
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # any unreadable file is simply "not a detector"
        return None
    initialisers = {t.name for t in model.graph.initializer}
    # old exports list weights as graph inputs too; count only the real (data) inputs
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    return len(inputs), len(model.graph.output)


def _onnx_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.onnx") if p.is_file())


def find_detection_model(pack_dir: str | Path) -> Path:
    """The detection .onnx of an insightface pack folder (or the path itself if it is an .onnx)."""
    pack = Path(pack_dir).expanduser()
    if pack.is_file() and pack.suffix.lower() == ".onnx":
        candidates = [pack]
    elif pack.is_file():
        raise IDAnimatorError(f"{pack} is a file, not a folder: give the insightface pack folder "
                              f"({PACK_FOLDER_HINT}) or its detection .onnx file.")
    elif not pack.is_dir():
        raise IDAnimatorError(
            f"insightface model folder not found: {pack}. Put the pack's .onnx files in {PACK_FOLDER_HINT}.")
    else:
        candidates = _onnx_files(pack)
        if not candidates:
            # the antelopev2 zip unpacks into antelopev2/antelopev2/; accept one nested level
            nested = [f for sub in sorted(pack.iterdir()) if sub.is_dir() for f in _onnx_files(sub)]
            if not nested:
                found = sorted(p.name for p in pack.iterdir())
                raise IDAnimatorError(
                    f"No .onnx file in the insightface model folder {pack} (found: "
                    f"{', '.join(found) or 'nothing'}). Put the pack's .onnx files in {PACK_FOLDER_HINT}.")
            candidates = nested
    # named detectors first, then the smallest files: recognition models are the big ones
    candidates.sort(key=lambda p: (not _DETECTOR_NAME.match(p.name), p.stat().st_size, p.name))
    without_keypoints = []
    for path in candidates:
        signature = _onnx_signature(path)
        if signature is None or signature[0] != 1 or signature[1] not in _DETECTOR_OUTPUTS:
            continue
        if _DETECTOR_OUTPUTS[signature[1]]:
            return path
        without_keypoints.append(path.name)
    if without_keypoints:
        raise IDAnimatorError(
            f"The face detector(s) {', '.join(without_keypoints)} in {pack} give no facial keypoints, "
            "which the official face alignment needs. Use a pack whose detector has keypoints "
            f"(buffalo_l's det_10g.onnx or antelopev2's scrfd_10g_bnkps.onnx) in {PACK_FOLDER_HINT}.")
    raise IDAnimatorError(
        f"No face detection model among {', '.join(p.name for p in candidates)} in {pack}: a detector "
        "(SCRFD/RetinaFace) has 1 input and 6, 9, 10 or 15 outputs. Put a full insightface pack "
        f"in {PACK_FOLDER_HINT}.")


class FaceDetector:
    """The detection model (SCRFD) of an insightface pack, run through insightface's own SCRFD code."""

    def __init__(self, pack_dir: str | Path, providers: Sequence[str] = (_CPU,),
                 det_thresh: float = 0.5, threads: int | None = None) -> None:
        """`threads`: onnxruntime threads (None: its default, every core); the face pool's
        worker processes take one each."""
        # imported here: insightface pulls in a lot and only the loader needs it
        import onnxruntime
        from insightface.model_zoo import model_zoo
        from insightface.model_zoo.scrfd import SCRFD

        self.model_file = find_detection_model(pack_dir)
        self.det_thresh = float(det_thresh)  # official FaceAnalysis default 0.5
        options = {}
        if threads is not None:
            options["sess_options"] = onnxruntime.SessionOptions()
            options["sess_options"].intra_op_num_threads = options["sess_options"].inter_op_num_threads = threads
        try:
            model = model_zoo.get_model(str(self.model_file), providers=list(providers), **options)
        except Exception as error:
            raise IDAnimatorError(
                f"Could not load the face detector {self.model_file} with providers {list(providers)}: "
                f"{error}. If the file is damaged, download the pack again into {PACK_FOLDER_HINT}; "
                "if a GPU provider failed, try provider CPU.") from error
        if not isinstance(model, SCRFD) or not model.use_kps:
            raise IDAnimatorError(
                f"{self.model_file} did not load as an insightface face detector with keypoints "
                f"(got {type(model).__name__}).")
        self._model = model
        in_use = self.providers_in_use
        logger.info("ID-Animator face detector %s on %s", self.model_file.name, ", ".join(in_use))
        if providers and providers[0] not in in_use:
            logger.warning("Face detector asked for %s but onnxruntime runs it on %s "
                           "(see README \"Face detection on the GPU\").", providers[0], ", ".join(in_use))

    @property
    def providers_in_use(self) -> list[str]:
        """Providers the onnxruntime session really uses (after any silent fallback)."""
        return list(self._model.session.get_providers())

    def input_size(self, det_size: int) -> tuple[int, int]:
        """(width, height) the detector really runs at: `det_size` square, or the model's fixed size."""
        fixed = self._model.static_input_size  # e.g. (640, 640) for an export with a fixed input
        if fixed is not None:
            return int(fixed[0]), int(fixed[1])
        det_size = int(det_size)
        if det_size < 32 or det_size % 32:
            raise IDAnimatorError(f"Detection size must be a positive multiple of 32 (SCRFD's "
                                  f"largest stride), got {det_size}.")
        return det_size, det_size

    def detect(self, image_rgb: np.ndarray, det_size: int = 640) -> list[DetectedFace]:
        """Faces in an HxWx3 uint8 RGB image, most confident first (insightface order)."""
        image_rgb = np.asarray(image_rgb)
        if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
            raise IDAnimatorError(f"FaceDetector.detect wants an HxWx3 uint8 RGB image, got shape "
                                  f"{image_rgb.shape} {image_rgb.dtype}; convert it with to_rgb_uint8.")
        width, height = self.input_size(det_size)
        rows, cols = image_rgb.shape[:2]
        # SCRFD letterboxes into (width, height); a sliver would resize to 0 pixels and crash cv2
        fit = min(width / cols, height / rows)
        if min(rows, cols) < MIN_DETECT_SIDE or min(rows, cols) * fit < MIN_DETECT_SIDE:
            return []
        image_bgr = np.ascontiguousarray(image_rgb[:, :, ::-1])  # insightface expects cv2's BGR
        try:
            boxes, keypoints = self._model.detect(image_bgr, input_size=(width, height),
                                                  det_thresh=self.det_thresh)
        except Exception as error:  # onnxruntime failures (GPU out of memory, broken provider)
            raise IDAnimatorError(
                f"Face detection with {self.model_file.name} at {width}x{height} on "
                f"{', '.join(self.providers_in_use)} failed: {error}. Try provider CPU.") from error
        # boxes: (N, 5) x1 y1 x2 y2 score, keypoints: (N, 5, 2); already sorted by score
        return [_make_face(box[:4], kps, box[4]) for box, kps in zip(boxes, keypoints)]


# ----------------------------------------------------------------------------- alignment

def align_face(image_rgb: np.ndarray | torch.Tensor, kps: np.ndarray) -> np.ndarray:
    """Official §4.1 crop: norm_crop to the 112 ArcFace template, then PIL bicubic to 224x224 RGB.

    warpAffine treats channels independently, so cropping the RGB image equals the official
    BGR crop followed by BGR->RGB, bit for bit.
    """
    crop_112 = norm_crop(image_rgb, kps, ALIGN_SIZE)
    crop = Image.fromarray(crop_112).resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(crop, dtype=np.uint8).copy()


def norm_crop(image_rgb: np.ndarray | torch.Tensor, kps: np.ndarray, size: int = ALIGN_SIZE) -> np.ndarray:
    """insightface `face_align.norm_crop`: the 5 keypoints onto the ArcFace template, size x size RGB.

    The crop every insightface recognition model is fed (`ArcFaceONNX.get`), and the first step
    of the official ID-Animator crop.
    """
    from insightface.utils import face_align

    image_rgb = to_rgb_uint8(image_rgb)
    kps = np.asarray(kps, dtype=np.float32)
    if kps.shape != (5, 2) or not np.isfinite(kps).all():
        raise IDAnimatorError(f"Face keypoints must be 5 finite (x, y) points, got shape {kps.shape}.")
    with warnings.catch_warnings():
        # insightface calls skimage's SimilarityTransform.estimate, deprecated in skimage 0.26
        warnings.simplefilter("ignore", FutureWarning)
        return face_align.norm_crop(image_rgb, kps, int(size))


def _check_mode(mode: str) -> None:
    if mode not in SELECT_MODES:
        raise IDAnimatorError(f"Unknown face selection {mode!r}; choose one of {', '.join(SELECT_MODES)}.")


def select_face(faces: Sequence[DetectedFace], mode: str, index: int = 0) -> DetectedFace | None:
    """Pick one face: "most confident" (official faces[0]), "largest" box, or "index".

    "index" counts faces left to right by the centre of their box (0 = leftmost), so a user can
    count them in the picture; insightface's own order (by score) is not visible to the user.
    """
    _check_mode(mode)
    if not faces:
        return None
    if mode == "most confident":
        return max(faces, key=lambda f: f.score)  # first one on ties, as faces[0]
    if mode == "largest":
        return max(faces, key=lambda f: f.area)
    left_to_right = sorted(faces, key=lambda f: f.centre_x)
    if not 0 <= index < len(left_to_right):
        raise IDAnimatorError(
            f"Face index {index} is out of range: {len(faces)} face(s) found in the image, "
            f"so the index must be 0..{len(faces) - 1} (0 = leftmost face).")
    return left_to_right[index]


DETECTION_SIZES = (320, 640, 512, 384, 256, 160)  # official first; see the module docstring


def detect_and_align(detector: FaceDetector, image: np.ndarray | torch.Tensor, mode: str = "most confident",
                     index: int = 0, det_sizes: Sequence[int] = DETECTION_SIZES
                     ) -> AlignedFace | None:
    """Detect (official size first, then others), select one face and crop it the official way.

    Returns None when no face is found at any size; the caller decides between error and skip.
    Detection runs on a copy downscaled to MAX_DETECT_SIDE; the crop uses the full image.
    """
    _check_mode(mode)
    image_rgb = to_rgb_uint8(image)
    faces = detect_faces(detector, image_rgb, det_sizes)
    if not faces:
        return None
    face = select_face(faces, mode, index)
    return AlignedFace(crop=align_face(image_rgb, face.kps), face=face, faces_found=len(faces))


def detect_faces(detector: FaceDetector, image: np.ndarray | torch.Tensor,
                 det_sizes: Sequence[int] = DETECTION_SIZES) -> list[DetectedFace]:
    """Every face at the first detection size that finds any (see the module docstring), in the
    input image's pixels, most confident first; [] when no size finds one."""
    if not det_sizes:
        raise IDAnimatorError("det_sizes is empty; give at least one detection size, e.g. (640,).")
    image_rgb = to_rgb_uint8(image)
    small, scale = _downscale_for_detection(image_rgb, MAX_DETECT_SIDE)
    faces: list[DetectedFace] = []
    tried: set[tuple[int, int]] = set()
    for det_size in det_sizes:
        size = detector.input_size(det_size)
        if size in tried:  # a fixed-size model runs at one size whatever is asked
            continue
        tried.add(size)
        faces = detector.detect(small, det_size)
        if faces:
            break
    if scale != 1.0:
        faces = [face.scaled(1.0 / scale) for face in faces]
    return faces
