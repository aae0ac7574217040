"""FaceEncode: reference photos of one person -> 16 identity tokens (official §4)."""
from __future__ import annotations

import comfy.model_management
import comfy.utils
import torch
from comfy_api.latest import io, ui

from ..adapter.clip_image import normalize
from ..adapter.errors import NoFaceError
from ..adapter.face_detection import detect_and_align
from ..adapter.identity import single_identity
from ..adapter.resampler import uncond_tokens
from .types import FACE_EMBEDS, ID_ANIMATOR, IDAnimator

FACE_SELECT = ["most confident", "largest", "index"]
ON_NO_FACE = ["error", "skip image"]


def clip_penultimate(clip_vision, pixels: torch.Tensor) -> torch.Tensor:
    """Already-normalized pixels (B,3,224,224) -> penultimate hidden states (B,257,1280) (§4.3)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    device = clip_vision.load_device
    out = clip_vision.model(pixel_values=pixels.to(device), intermediate_output=-2)
    return out[1].float()


def normalize_crops(crops: torch.Tensor) -> torch.Tensor:
    """(B,224,224,3) in 0..1 -> CLIP-normalized (B,3,224,224), as CLIPImageProcessor does (§4.2)."""
    return normalize(crops.permute(0, 3, 1, 2))


def resample(id_animator: IDAnimator, hidden: torch.Tensor) -> torch.Tensor:
    patcher = id_animator.resampler_patcher
    comfy.model_management.load_model_gpu(patcher)
    resampler = patcher.model
    param = next(resampler.parameters())
    with torch.no_grad():
        return resampler(hidden.to(param.device, param.dtype)).float().cpu()


def unconditional_tokens(id_animator: IDAnimator) -> torch.Tensor:
    """The negative face tokens (16,768) on the CPU: the same for every photo (official §4.4)."""
    clip_vision = id_animator.clip_vision
    with torch.no_grad():
        tokens = uncond_tokens(lambda px: clip_penultimate(clip_vision, px),
                               lambda h: resample(id_animator, h), device="cpu")
    return tokens.float().cpu()


class FaceEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FaceEncode",
            display_name="Face Encode (ID-Animator)",
            category="id_animator",
            description="Detects and aligns the face in each reference photo exactly as the official "
                        "pipeline does, and encodes it to 16 identity tokens; several photos of one person "
                        "are averaged.",
            search_aliases=["face embeds", "identity", "reference face", "insightface"],
            inputs=[
                ID_ANIMATOR.Input("id_animator", tooltip="From Load ID-Animator."),
                io.Image.Input("image", tooltip="Photos of ONE person (a batch is averaged into one identity). "
                                                "Use IDMix to combine different people."),
                io.Combo.Input("face_select", options=FACE_SELECT, default="most confident",
                               tooltip="Which face when a photo holds several: most confident (official), "
                                       "largest, or index (counted left to right, from 0)."),
                io.Int.Input("face_index", default=0, min=0, max=256,
                             tooltip="With face_select = index: which face, counted left to right from 0."),
                io.Combo.Input("on_no_face", options=ON_NO_FACE, default="error",
                               tooltip="A photo without a detectable face: stop with an error, or skip it "
                                       "(an error is still raised if no photo has a face)."),
            ],
            outputs=[
                FACE_EMBEDS.Output(display_name="face_embeds", tooltip="Identity tokens for IDMix or ApplyFaceAdapter."),
                io.Image.Output(display_name="face_crops",
                                tooltip="The aligned 224x224 face crops that were encoded, one per used photo."),
            ],
        )

    @classmethod
    def execute(cls, id_animator: IDAnimator, image: torch.Tensor, face_select: str, face_index: int,
                on_no_face: str) -> io.NodeOutput:
        if image.shape[0] == 0:
            raise NoFaceError("FaceEncode got an empty image batch: connect at least one photo.")
        progress = comfy.utils.ProgressBar(image.shape[0])
        crops, missing = [], []
        for i, photo in enumerate(image):
            aligned = detect_and_align(id_animator.detector, photo, face_select, face_index)
            if aligned is None:
                missing.append(i)
            else:
                crops.append(torch.from_numpy(aligned.crop).float() / 255.0)
            progress.update(1)
        if missing and (on_no_face == "error" or len(missing) == image.shape[0]):
            which = ", ".join(str(i) for i in missing)
            raise NoFaceError(
                f"FaceEncode: no face found in image(s) {which} of {image.shape[0]} (0-based). Use a clear, "
                "front-facing photo where the face is at least ~60 px tall, crop closer to the face, or set "
                "on_no_face to 'skip image' to ignore photos without a face.")
        crop_batch = torch.stack(crops)  # (N,224,224,3)
        clip_vision = id_animator.clip_vision
        with torch.no_grad():
            hidden = clip_penultimate(clip_vision, normalize_crops(crop_batch))
            face_tokens = resample(id_animator, hidden)  # (N,16,768)
        uncond = id_animator.uncond.get(lambda: unconditional_tokens(id_animator))
        embeds = single_identity(face_tokens, uncond, id_animator.source)
        return io.NodeOutput(embeds, crop_batch, ui=ui.PreviewImage(crop_batch, cls=cls))
