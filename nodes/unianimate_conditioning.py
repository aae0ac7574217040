"""UniAnimateConditioning: reference photo + pose frames → positive, negative and the starting
LATENT for KSampler (official entrance `worker`, reference §4)."""
from __future__ import annotations

import logging

import comfy.model_management
import torch
from comfy_api.latest import io

from ..unianimate.errors import UniAnimateInputError
from ..unianimate.noise_prior import (OFFICIAL_STEPS, PRIOR_T_LONG, PRIOR_T_SHORT, SD_SCALE, ddim_timesteps,
                                      draw_noise, noise_prior, plain_noise, starting_latent)
from ..unianimate.preprocess import clip_pixels, frames_first, pil_resize
from .unianimate_model import IMAGE_COND, LOCAL_IMAGE_COND, POSE_COND, REFERENCE_COND, conditioned_pair

MODES = ["randomref", "local_image"]
STARTS = ["noise prior", "noise prior (long video)", "plain noise"]
SIZE_MULTIPLE = 64  # the latent (÷8) goes through three stride-2 levels whose skips must line up


def zero_y(clip) -> torch.Tensor:
    """The empty prompt through the SD2.1 text encoder: OpenCLIP-H penultimate layer + ln_final,
    [1, 77, 1024] (official `zero_y`; ComfyUI's SD2 CLIP uses exactly that layer and padding)."""
    context = clip.encode_from_tokens(clip.tokenize("")).float().cpu()
    if tuple(context.shape) != (1, 77, 1024):
        raise UniAnimateInputError(
            f"UniAnimateConditioning: the text encoder gives {list(context.shape)} for the empty prompt; "
            "UniAnimate needs the SD2.1 text encoder (OpenCLIP ViT-H, 77 × 1024): Load CLIP with its text encoder "
            "(type stable_diffusion), or the CLIP output of v2-1_512-ema-pruned.ckpt in Load Checkpoint (an SD1.5 "
            "CLIP-L gives 768).")
    return context


def clip_image_embeds(clip_vision, image: torch.Tensor) -> torch.Tensor:
    """[1, H, W, 3] → the projected ViT-H/14 embedding [1, 1, 1024] (official `image`)."""
    comfy.model_management.load_model_gpu(clip_vision.patcher)
    pixels = clip_pixels(image).to(clip_vision.load_device)
    # as FaceEncode: a caller outside the executor's inference mode (another pack, a test) would
    # otherwise keep the tower's autograd graph, about 3 GB a call
    with torch.no_grad():
        out = clip_vision.model(pixel_values=pixels, intermediate_output=-2)
    embeds = out[2].float().cpu()
    if tuple(embeds.shape) != (1, 1024):
        raise UniAnimateInputError(
            f"UniAnimateConditioning: this CLIP vision model gives image embeddings of width "
            f"{embeds.shape[-1]}; UniAnimate needs OpenCLIP ViT-H/14 (1024), e.g. "
            "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors in models/clip_vision/.")
    return embeds.unsqueeze(1)


def check_inputs(reference_image: torch.Tensor, pose_frames: torch.Tensor, reference_pose: torch.Tensor) -> None:
    height, width = pose_frames.shape[1:3]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise UniAnimateInputError(
            f"UniAnimateConditioning: the pose frames are {width}×{height} px; UniAnimate needs both sides "
            f"divisible by {SIZE_MULTIPLE} (the official sizes are 512×768 and 768×1216). Resize the pose "
            f"frames, e.g. to {max(64, round(width / 64) * 64)}×{max(64, round(height / 64) * 64)}.")
    if reference_pose.shape[0] != 1:
        raise UniAnimateInputError(
            f"UniAnimateConditioning: reference_pose holds {reference_pose.shape[0]} images; give exactly one "
            "(the pose of the reference photo, from UniAnimatePose).")
    if tuple(reference_pose.shape[1:3]) != (height, width):
        raise UniAnimateInputError(
            f"UniAnimateConditioning: reference_pose is {reference_pose.shape[2]}×{reference_pose.shape[1]} px "
            f"but the pose frames are {width}×{height}: draw both at one size (UniAnimatePose does).")
    if reference_image.shape[0] != 1:
        raise UniAnimateInputError(
            f"UniAnimateConditioning: reference_image holds {reference_image.shape[0]} images; give exactly "
            "one photo of the person.")


class UniAnimateConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniAnimateConditioning",
            display_name="UniAnimate Conditioning",
            category="id_animator/unianimate",
            description="Encodes the reference photo (VAE latent, CLIP image tokens) and the pose frames into "
                        "positive/negative conditioning for a UniAnimate MODEL, and makes the starting latent "
                        "with the official noise prior. Sample with KSamplerAdvanced: add_noise disable, "
                        "scheduler ddim_uniform, sampler euler (the official DDIM), cfg 2.5.",
            search_aliases=["unianimate", "pose video", "dance", "animate photo", "reference"],
            inputs=[
                io.Image.Input("reference_image", tooltip="One photo of the person; stretched to the pose size "
                                                          "(as the official code does)."),
                io.Image.Input("pose_frames", tooltip="The driving pose images, one per output frame (from "
                                                      "UniAnimatePose; other DWPose renderings work unaligned). "
                                                      "Their size is the video size: multiples of 64 px."),
                io.Image.Input("reference_pose", tooltip="The pose drawn from the reference photo, same size as "
                                                         "the pose frames."),
                io.Vae.Input("vae", tooltip="The SD2.1 VAE (Load VAE; the VAE of v2-1_512-ema-pruned)."),
                io.Clip.Input("clip", tooltip="The SD2.1 text encoder (Load CLIP, type stable_diffusion, or "
                                              "the SD2.1 checkpoint's CLIP): only the empty prompt is "
                                              "encoded (UniAnimate takes no text)."),
                io.ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-H/14 (the official "
                                                           "open_clip_pytorch_model.bin is the same model)."),
                io.Combo.Input("mode", options=MODES, default="randomref",
                               tooltip="randomref: the reference latent and pose enter as frame 0 (official "
                                       "default). local_image: the reference photo is added into every "
                                       "frame's features instead (the official first-frame mode)."),
                io.Combo.Input("start", options=STARTS, default="noise prior",
                               tooltip="noise prior: the reference latent noised to t = 949 (official short "
                                       "videos); (long video): t = 939 with the offset noise after it "
                                       "(official long videos); plain noise: no reference in the start."),
                io.Int.Input("seed", default=11, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the starting noise (the LATENT carries it: sample with add_noise "
                                     "disabled)."),
                io.Int.Input("steps", default=OFFICIAL_STEPS, min=1, max=1000, advanced=True,
                             tooltip="The sampler's steps with ddim_uniform (30 = official). Sets which "
                                     "timestep the latent is scaled for; other schedulers start elsewhere."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Pose, reference and image tokens."),
                io.Conditioning.Output(display_name="negative", tooltip="The official unconditional branch: "
                                                                        "every condition marked absent (KSampler "
                                                                        "runs it in one batch with the positive)."),
                io.Latent.Output(display_name="latent", tooltip="[1, 4, frames, H/8, W/8] with the starting "
                                                                "noise in it."),
            ],
        )

    @classmethod
    def execute(cls, reference_image: torch.Tensor, pose_frames: torch.Tensor, reference_pose: torch.Tensor,
                vae, clip, clip_vision, mode: str, start: str, seed: int, steps: int) -> io.NodeOutput:
        check_inputs(reference_image, pose_frames, reference_pose)
        frames, height, width = pose_frames.shape[0], pose_frames.shape[1], pose_frames.shape[2]
        if tuple(reference_image.shape[1:3]) != (height, width):
            logging.info("UniAnimate: reference photo %s×%s stretched to %s×%s", reference_image.shape[2],
                         reference_image.shape[1], width, height)
        reference = pil_resize(reference_image, height, width)
        latent_ref = vae.encode(reference).float().cpu() * SD_SCALE  # [1, 4, h, w]; the posterior mean
        reference_latent = latent_ref.unsqueeze(2)  # [1, 4, 1, h, w]
        context = zero_y(clip)
        poses = frames_first(torch.cat([pil_resize(reference_pose, height, width), pose_frames[..., :3]]))
        conds = {POSE_COND: poses, IMAGE_COND: clip_image_embeds(clip_vision, reference_image)}
        if mode == "randomref":
            conds[REFERENCE_COND] = reference_latent
        else:
            conds[LOCAL_IMAGE_COND] = frames_first(reference.repeat(frames, 1, 1, 1))
        noise, offset = draw_noise((1, 4, frames, height // 8, width // 8), seed)
        if start == "plain noise":
            x_init = plain_noise(noise, offset)
        else:
            long_video = start != "noise prior"
            x_init = noise_prior(reference_latent, noise, offset, PRIOR_T_LONG if long_video else PRIOR_T_SHORT,
                                 long_video=long_video)
        latent = starting_latent(x_init, ddim_timesteps(steps)[0])
        positive, negative = conditioned_pair(conds)
        return io.NodeOutput([[context, positive]], [[context.clone(), negative]], {"samples": latent})
