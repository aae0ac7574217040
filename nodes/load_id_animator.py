"""LoadIDAnimator: the face adapter, the CLIP ViT-H/14 vision tower and a face detector."""
from __future__ import annotations

import logging
import time

import comfy.clip_vision
import comfy.model_management
import comfy.model_patcher
import comfy.ops
import folder_paths
from comfy_api.latest import io

from ..adapter.checkpoint import check_clip_vision_h, clip_vision_expected, load_adapter_checkpoint
from ..adapter.errors import CheckpointError
from ..adapter.face_detection import FaceDetector, resolve_providers
from ..adapter.identity import AdapterSource
from ..adapter.resampler import Resampler
from ..adapter.weights_file import read_state_dict
from . import folders
from .shared_models import result_of_files, shared_load
from .types import ID_ANIMATOR, IDAnimator

PROVIDERS = ["auto", "CPU", "CUDA", "ROCM", "CoreML"]
DOWNLOAD_HINT = ("animator.ckpt comes from the ID-Animator Hugging Face Space "
                 "(huggingface.co/spaces/ID-Animator/ID-Animator) and goes in models/id_animator/.")


def load_clip_vision_h(name: str, path: str):
    """The pack's safe reader and its ViT-H/14 check (official §4.3), the same as the trainer's, so
    a wrong file gets the same message; then ComfyUI's own CLIP vision model from the tensors.
    `name` is the file as the user picked it (for messages), `path` where it resolved."""
    with clip_vision_expected():
        state = read_state_dict(path)
    state = state.get("state_dict", state)  # Lightning-era nesting
    check_clip_vision_h(path, state)
    clip_vision = comfy.clip_vision.load_clipvision_from_sd(state, prefix="", convert_keys=True)
    if clip_vision is None:
        raise CheckpointError(
            f"clip_vision '{name}' is not a CLIP vision model ComfyUI recognises. ID-Animator needs "
            "OpenCLIP ViT-H/14 (the IP-Adapter SD1.5 image encoder, e.g. "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) in models/clip_vision/.")
    return clip_vision


class LoadIDAnimator(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadIDAnimator",
            display_name="Load ID-Animator",
            category="id_animator",
            description="Loads the ID-Animator face adapter, the CLIP ViT-H/14 image encoder and an "
                        "insightface face detector, for FaceEncode and ApplyFaceAdapter.",
            search_aliases=["id animator", "face adapter", "identity video", "insightface"],
            inputs=[
                io.Combo.Input("adapter_name", options=folders.adapter_files(),
                               tooltip="The ID-Animator adapter (animator.ckpt, or a converted .safetensors) "
                                       "in models/id_animator/."),
                io.Combo.Input("clip_vision_name", options=folder_paths.get_filename_list("clip_vision"),
                               tooltip="CLIP ViT-H/14 image encoder in models/clip_vision/ (the IP-Adapter "
                                       "SD1.5 encoder, CLIP-ViT-H-14-laion2B-s32B-b79K). ViT-L or bigG will not work."),
                io.Combo.Input("face_detector", options=folders.detector_packs(),
                               tooltip="insightface pack folder under models/insightface/models/ (buffalo_l, "
                                       "antelopev2, or a folder holding one SCRFD detector). Only its detection "
                                       "model is loaded."),
                io.Combo.Input("provider", options=PROVIDERS, default="auto",
                               tooltip="Where the face detector runs (onnxruntime). auto = CUDA/ROCm/CoreML when "
                                       "this onnxruntime has it, else CPU. Detection is a small part of the work."),
            ],
            outputs=[ID_ANIMATOR.Output(display_name="id_animator",
                                                    tooltip="Adapter, image encoder and detector, for FaceEncode "
                                                            "and ApplyFaceAdapter.")],
        )

    @classmethod
    def validate_inputs(cls, adapter_name: str, clip_vision_name: str, face_detector: str) -> bool | str:
        """Say which file is missing and where it goes, before anything runs."""
        problems = []
        if folder_paths.get_full_path(folders.ADAPTER_FOLDER, adapter_name) is None:
            problems.append(f"adapter '{adapter_name}' is not in "
                            f"{' or '.join(folder_paths.get_folder_paths(folders.ADAPTER_FOLDER))}. {DOWNLOAD_HINT}")
        if folder_paths.get_full_path("clip_vision", clip_vision_name) is None:
            problems.append(f"clip_vision '{clip_vision_name}' is not in "
                            f"{' or '.join(folder_paths.get_folder_paths('clip_vision'))}: put the CLIP ViT-H/14 "
                            "image encoder (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors) there.")
        if face_detector not in folders.detector_packs():
            problems.append(f"face_detector '{face_detector}' is not a folder in "
                            f"{' or '.join(folders.insightface_roots())}: unzip an insightface pack "
                            "(e.g. buffalo_l) there so its .onnx files are directly inside.")
        return "; ".join(problems) if problems else True

    @classmethod
    def execute(cls, adapter_name: str, clip_vision_name: str, face_detector: str, provider: str) -> io.NodeOutput:
        adapter_path = folder_paths.get_full_path_or_raise(folders.ADAPTER_FOLDER, adapter_name)
        clip_vision_path = folder_paths.get_full_path_or_raise("clip_vision", clip_vision_name)
        weights = load_adapter_checkpoint(adapter_path)
        started = time.perf_counter()
        source = AdapterSource.of(weights, adapter_name)  # FACE_EMBEDS carry it: see adapter.identity
        logging.info("ID-Animator: adapter %s fingerprinted in %.2f s", source, time.perf_counter() - started)
        resampler = Resampler(operations=comfy.ops.disable_weight_init)  # no random init: loaded next
        resampler.load_state_dict(weights.resampler)
        resampler.eval()
        resampler_patcher = comfy.model_patcher.CoreModelPatcher(
            resampler, load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device())
        clip_vision = shared_load("clip_vision", clip_vision_path,
                                  lambda: load_clip_vision_h(clip_vision_name, clip_vision_path))  # one tower per file
        detector = FaceDetector(folders.detector_pack_path(face_detector), resolve_providers(provider))
        logging.info("ID-Animator: loaded %s; face detector %s runs on %s", adapter_name, face_detector,
                     ", ".join(detector.providers_in_use))
        # the unconditional tokens depend only on the two files: a reload of them reuses the tokens
        uncond = result_of_files("uncond_tokens", clip_vision_path, adapter_path)
        return io.NodeOutput(IDAnimator(adapter_name, weights, resampler_patcher, clip_vision, detector, source,
                                        uncond))
