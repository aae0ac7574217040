"""IDA_LoadFaceScorer: the models FaceSimilarity scores with, loaded once and cached by ComfyUI.

A pack's recognition model is 170-250 MB of ONNX; loaded in FaceSimilarity's `execute` it would
be read again for every new video. As a loader node its output stays in ComfyUI's cache while its
inputs do not change, so a second queue (a new seed, another video) reuses it. The detector can
come from a LoadIDAnimator that already holds one, so a render-and-score graph loads it once.
"""
from __future__ import annotations

import logging
from typing import Optional

from comfy_api.latest import io

from ..adapter.errors import IDAnimatorError
from ..adapter.face_detection import FaceDetector, resolve_providers
from ..adapter.face_recognition import FaceRecognizer
from . import folders
from .load_id_animator import PROVIDERS
from .types import FACE_SCORER, ID_ANIMATOR, FaceScorer, IDAnimator

NODE = "Load Face Scorer"


class LoadFaceScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDA_LoadFaceScorer",
            display_name="Load Face Scorer (ID-Animator)",
            category="id_animator",
            description="Loads an insightface pack's face recognition model (ArcFace) and a face detector "
                        "for Face Similarity; connect a Load ID-Animator to reuse the detector it holds.",
            search_aliases=["face similarity", "arcface", "insightface", "identity score", "face recognition"],
            inputs=[
                io.Combo.Input("insightface_pack", options=folders.detector_packs(),
                               tooltip="insightface pack folder under models/insightface/models/ with a recognition "
                                       "model: buffalo_l (w600k_r50.onnx) or antelopev2 (glintr100.onnx). Scores "
                                       "from different recognition models are not comparable."),
                io.Combo.Input("provider", options=PROVIDERS, default="auto",
                               tooltip="Where recognition (and this pack's detector) run (onnxruntime): auto = "
                                       "CUDA/ROCm/CoreML when this onnxruntime has it, else CPU."),
                ID_ANIMATOR.Input("id_animator", optional=True,
                                  tooltip="Optional: a Load ID-Animator whose face detector is reused (loaded once "
                                          "for encoding and scoring). Unconnected: the pack's own detector is loaded."),
            ],
            outputs=[FACE_SCORER.Output(display_name="face_scorer",
                                        tooltip="Recognition model and detector, for Face Similarity.")],
        )

    @classmethod
    def validate_inputs(cls, insightface_pack: str) -> bool | str:
        if insightface_pack not in folders.detector_packs():
            return (f"insightface_pack '{insightface_pack}' is not a folder in "
                    f"{' or '.join(folders.insightface_roots())}: unzip an insightface pack with a recognition "
                    "model (buffalo_l or antelopev2) there so its .onnx files are directly inside.")
        return True

    @classmethod
    def execute(cls, insightface_pack: str, provider: str,
                id_animator: Optional[IDAnimator] = None) -> io.NodeOutput:
        pack = folders.detector_pack_path(insightface_pack)
        providers = resolve_providers(provider)
        try:
            recognizer = FaceRecognizer(pack, providers)  # first: a pack without one fails fast
            detector = id_animator.detector if id_animator is not None else FaceDetector(pack, providers)
        except IDAnimatorError as error:
            raise type(error)(f"{NODE}: {error}") from error
        logging.info("ID-Animator: face scorer %s (%s); detector %s", insightface_pack,
                     recognizer.model_file.name, "from Load ID-Animator" if id_animator is not None else "of the pack")
        return io.NodeOutput(FaceScorer(insightface_pack, recognizer, detector))
