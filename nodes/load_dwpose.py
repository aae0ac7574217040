"""LoadDWPose: the two DWPose ONNX files (person detector + whole-body keypoints) for UniAnimatePose."""
from __future__ import annotations

import logging

import folder_paths
from comfy_api.latest import io

from ..adapter.face_detection import resolve_providers
from ..unianimate.pose.dwpose import DETECTOR_FILE, POSE_FILE, SOURCE, DWPoseModel
from . import folders
from .types import DWPOSE_ONNX

PROVIDERS = ["auto", "CPU", "CUDA", "ROCM", "CoreML"]


def _default(files: list[str], name: str) -> str | None:
    """The official file name when it is there (also inside a sub-folder), else the first file."""
    matches = [f for f in files if f.replace("\\", "/").rsplit("/", 1)[-1] == name]
    return (matches or files or [None])[0]


class LoadDWPose(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        files = folders.dwpose_files()
        return io.Schema(
            node_id="IDA_LoadDWPose",
            display_name="Load DWPose (UniAnimate)",
            category="id_animator/unianimate",
            description="Loads the DWPose person detector and whole-body keypoint model (ONNX) that "
                        "UniAnimate's pose extraction uses, for UniAnimate Pose.",
            search_aliases=["dwpose", "pose estimation", "openpose", "yolox", "rtmpose", "unianimate"],
            inputs=[
                io.Combo.Input("detector", options=files, default=_default(files, DETECTOR_FILE),
                               tooltip=f"The YOLOX-L person detector, {DETECTOR_FILE}, in models/dwpose/."),
                io.Combo.Input("pose_model", options=files, default=_default(files, POSE_FILE),
                               tooltip=f"The DWPose whole-body keypoint model, {POSE_FILE} (RTMPose, 133 "
                                       "points, 288x384 input), in models/dwpose/."),
                io.Combo.Input("provider", options=PROVIDERS, default="auto",
                               tooltip="Where onnxruntime runs both models. auto = CUDA/ROCm/CoreML when this "
                                       "onnxruntime has it, else CPU. On CPU expect about a second per frame."),
            ],
            outputs=[DWPOSE_ONNX.Output(display_name="dwpose",
                                        tooltip="Detector and keypoint model, for UniAnimate Pose.")],
        )

    @classmethod
    def validate_inputs(cls, detector: str, pose_model: str) -> bool | str:
        """Say which file is missing and where it goes, before anything runs."""
        where = " or ".join(folder_paths.get_folder_paths(folders.DWPOSE_FOLDER))
        missing = [f"'{name}'" for name in (detector, pose_model)
                   if not name or folder_paths.get_full_path(folders.DWPOSE_FOLDER, name) is None]
        if missing:
            return (f"DWPose file {' and '.join(missing)} not found in {where}: put {DETECTOR_FILE} and "
                    f"{POSE_FILE} from {SOURCE} there.")
        return True

    @classmethod
    def execute(cls, detector: str, pose_model: str, provider: str) -> io.NodeOutput:
        model = DWPoseModel(folder_paths.get_full_path_or_raise(folders.DWPOSE_FOLDER, detector),
                            folder_paths.get_full_path_or_raise(folders.DWPOSE_FOLDER, pose_model),
                            resolve_providers(provider))
        logging.info("UniAnimate: DWPose %s + %s on %s", detector, pose_model, ", ".join(model.providers_in_use))
        return io.NodeOutput(model)
