"""UniAnimatePose: reference photo + driving video frames -> the aligned pose images UniAnimate takes
(official run_align_pose: DWPose, alignment to the reference body, the official drawing)."""
from __future__ import annotations

import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io

from ..adapter.errors import PoseError
from ..unianimate.pose.draw import CANVAS_HEIGHT, CANVAS_WIDTH, model_view
from ..unianimate.pose.dwpose import DWPoseModel
from ..unianimate.pose.video import ALIGN_MODES, MISSING_PERSON_MODES, pose_video
from .types import DWPOSE_ONNX


def to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """One IMAGE frame (H,W,C) in [0,1] -> HxWx3 uint8 BGR, as cv2 reads the official inputs
    (rounded, so 8-bit files survive the round trip exactly; alpha dropped)."""
    if image.shape[-1] not in (1, 3, 4):
        raise PoseError(f"UniAnimate Pose needs RGB images, got {image.shape[-1]} channels.")
    rgb = image[..., :3] if image.shape[-1] >= 3 else image.expand(*image.shape[:-1], 3)
    rgb = (rgb.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def to_image(canvases: np.ndarray) -> torch.Tensor:
    """Official canvases (F,H,W,3) uint8 -> IMAGE: what the official inference reads from its files."""
    return torch.from_numpy(model_view(canvases)).float() / 255.0


class UniAnimatePose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniAnimatePose",
            display_name="UniAnimate Pose",
            category="id_animator/unianimate",
            description="Finds the person in the reference photo and in every driving video frame (DWPose), "
                        "rescales the driving poses to the reference body as the official code does, and draws "
                        "the pose images UniAnimate was trained on.",
            search_aliases=["dwpose", "pose video", "dance", "align pose", "openpose", "unianimate"],
            inputs=[
                DWPOSE_ONNX.Input("dwpose", tooltip="From Load DWPose (UniAnimate)."),
                io.Image.Input("reference_image", tooltip="The photo of the person to animate (the first image "
                                                          "of the batch is used). Best: whole body, face and "
                                                          "hands visible."),
                io.Image.Input("driving_frames", tooltip="The frames of the dance video, in order. Its first "
                                                         "frame sets the alignment: it should show the whole "
                                                         "body, face and hands."),
                io.Combo.Input("alignment", options=list(ALIGN_MODES), default=ALIGN_MODES[0],
                               tooltip="official, missing bones kept: the official rescaling, but a bone whose "
                                       "end is not seen in the reference or the first frame keeps its length "
                                       "(the official code bends it). official (exact): run_align_pose as is. "
                                       "none: the driving poses as detected."),
                io.Combo.Input("missing_person", options=list(MISSING_PERSON_MODES), default=MISSING_PERSON_MODES[0],
                               tooltip="A driving frame (after the first) where no person is found: draw it black "
                                       "(one warning lists them), estimate a pose on the whole image as the "
                                       "official code does, or stop with an error."),
                io.Int.Input("width", default=CANVAS_WIDTH, min=64, max=4096, step=64, advanced=True,
                             tooltip="Pose image width in px. The official code always draws 512 x 768 and "
                                     "resizes later; line widths do not scale with the canvas."),
                io.Int.Input("height", default=CANVAS_HEIGHT, min=64, max=4096, step=64, advanced=True,
                             tooltip="Pose image height in px (official: 768)."),
            ],
            outputs=[
                io.Image.Output(display_name="pose_frames",
                                tooltip="One aligned pose image per driving frame, in the colours the model "
                                        "reads (the official files' BGR/RGB swap included)."),
                io.Image.Output(display_name="reference_pose",
                                tooltip="The reference photo's own pose, unaligned, as the official ref_pose.jpg."),
            ],
        )

    @classmethod
    def execute(cls, dwpose: DWPoseModel, reference_image: torch.Tensor, driving_frames: torch.Tensor,
                alignment: str, missing_person: str, width: int, height: int) -> io.NodeOutput:
        if reference_image.shape[0] == 0 or driving_frames.shape[0] == 0:
            raise PoseError("UniAnimate Pose got an empty image batch: connect a reference photo and at least "
                            "one driving frame.")
        progress = comfy.utils.ProgressBar(driving_frames.shape[0])
        frames = (to_bgr_uint8(frame) for frame in driving_frames)
        result = pose_video(dwpose, to_bgr_uint8(reference_image[0]), frames, alignment, missing_person,
                            height=height, width=width, progress=lambda done: progress.update_absolute(done))
        return io.NodeOutput(to_image(result.frame_canvases), to_image(result.reference_canvas[None]))
