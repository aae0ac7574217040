"""Thin ComfyUI glue (V3 schema): one file per node, the attention patch, model folders."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import folders
from .apply_face_adapter import ApplyFaceAdapter
from .face_encode import FaceEncode
from .face_similarity import FaceSimilarity
from .id_mix import IDMix
from .load_dwpose import LoadDWPose
from .load_face_scorer import LoadFaceScorer
from .load_id_animator import LoadIDAnimator
from .load_unianimate import LoadUniAnimate
from .unianimate_conditioning import UniAnimateConditioning
from .unianimate_frames import UniAnimateLatentFrames
from .unianimate_pose import UniAnimatePose
from .unianimate_windows import UniAnimateContextWindows

NODES: list[type[io.ComfyNode]] = [LoadIDAnimator, FaceEncode, IDMix, ApplyFaceAdapter, LoadFaceScorer,
                                   FaceSimilarity, LoadDWPose, UniAnimatePose, LoadUniAnimate,
                                   UniAnimateConditioning, UniAnimateLatentFrames, UniAnimateContextWindows]


class IDAnimatorExtension(ComfyExtension):
    async def on_load(self) -> None:
        folders.register()

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


def extension() -> IDAnimatorExtension:
    folders.register()  # before any schema lists files (on_load runs later on some versions)
    return IDAnimatorExtension()
