"""Socket types of this pack, declared once.

- `ID_ANIMATOR` carries an `IDAnimator`: the validated adapter weights and which adapter they are
  (file name + fingerprint), the Resampler (wrapped in a ModelPatcher so ComfyUI's memory
  management moves it), the CLIP ViT-H/14 vision tower (one object for every loader naming the
  same file: nodes.shared_models), the face detector, and the unconditional face tokens, computed
  by the first FaceEncode and then kept (they depend only on the CLIP file and the adapter file,
  so every loader of the same two files shares them: nodes.shared_models.result_of_files).
- `FACE_SCORER` carries a `FaceScorer`: an insightface pack's recognition model and a face
  detector (that pack's own, or the one a LoadIDAnimator already holds), for FaceSimilarity.
- `FACE_EMBEDS` carries an `adapter.identity.FaceEmbeds`: 16 face tokens per identity, the
  unconditional tokens, how identities blend across the frames of the video, and the adapter
  that made them.
- `DWPOSE_ONNX` carries a `unianimate.pose.dwpose.DWPoseModel`: the YOLOX person detector and
  the DWPose whole-body keypoint model, two onnxruntime sessions checked on load.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from comfy_api.latest import io

from ..adapter.checkpoint import AdapterWeights
from ..adapter.face_detection import FaceDetector
from ..adapter.face_recognition import FaceRecognizer
from ..adapter.identity import AdapterSource

ID_ANIMATOR = io.Custom("ID_ANIMATOR")
FACE_EMBEDS = io.Custom("FACE_EMBEDS")
DWPOSE_ONNX = io.Custom("DWPOSE_ONNX")
FACE_SCORER = io.Custom("FACE_SCORER")


@dataclass(eq=False)
class ComputedOnce:
    """A tensor computed on first use and then kept, so that its frozen owner stays immutable."""

    value: Optional[torch.Tensor] = None

    def get(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if self.value is None:
            self.value = compute()
        return self.value


@dataclass(frozen=True)
class IDAnimator:
    adapter_name: str
    weights: AdapterWeights
    resampler_patcher: Any  # comfy.model_patcher.ModelPatcher around adapter.resampler.Resampler
    clip_vision: Any  # comfy.clip_vision.ClipVisionModel (ViT-H/14)
    detector: FaceDetector
    # Fingerprinted once here (LoadIDAnimator passes it in; built without it, e.g. by a bench
    # script, it is computed on construction): ~0.13 s for the 61.8 M parameters on one core.
    source: Optional[AdapterSource] = None
    # Resampler(CLIP(zero normalized pixels)) (16, 768): one ViT-H forward per CLIP file and
    # adapter file, not one per FaceEncode or per reload of the same files (LoadIDAnimator passes
    # the slot those files share).
    uncond: ComputedOnce = field(default_factory=ComputedOnce, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.source is None:
            object.__setattr__(self, "source", AdapterSource.of(self.weights, self.adapter_name))


@dataclass(frozen=True)
class FaceScorer:
    pack: str  # the insightface pack of the recognition model (scores of two packs do not compare)
    recognizer: FaceRecognizer
    detector: FaceDetector
