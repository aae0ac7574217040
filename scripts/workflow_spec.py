"""What the shared workflows contain: the eleven graphs, the model files they name, and the one
table of third-party node definitions (AnimateDiff-Evolved, Advanced-ControlNet).

Graphs are written by input *name* (widget values and links alike); `make_workflows.py` turns
them into the frontend's UI format using each node's live `/object_info` definition (ours and
ComfyUI core) or, for third-party nodes, the table below. Nothing here knows widget order.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# --- Third-party nodes -------------------------------------------------------------------------
# Definitions in `/object_info` shape, copied from the packs' sources at the pinned commits and
# verified with `make_workflows.py --third-party DIR` (loads the real packs into ComfyUI and
# compares). A combo whose options are model files carries {"files": "<models folder>"} instead
# of a fixed option list.
ADE_REPO, ADE_COMMIT = "Kosinkadink/ComfyUI-AnimateDiff-Evolved", "d8d163cd90b1111f6227495e3467633676fbb346"
ACN_REPO, ACN_COMMIT = "Kosinkadink/ComfyUI-Advanced-ControlNet", "9e60d8a9c8016c5315063aa7af66b321a0444df7"
PACKS = {  # pack -> (registry id, GitHub repository, pinned commit)
    "AnimateDiff-Evolved": ("comfyui-animatediff-evolved", ADE_REPO, ADE_COMMIT),
    "Advanced-ControlNet": ("comfyui-advanced-controlnet", ACN_REPO, ACN_COMMIT),
}
BETA_SCHEDULES = ["autoselect", "use existing", "sqrt_linear (AnimateDiff)", "linear (AnimateDiff-SDXL)",
                  "linear (HotshotXL/default)", "avg(sqrt_linear,linear)", "lcm avg(sqrt_linear,linear)", "lcm",
                  "lcm[100_ots]", "lcm >> sqrt_linear", "sqrt", "cosine", "squaredcos_cap_v2"]
FUSE_METHODS = ["pyramid", "flat", "overlap-linear", "\U0001f52cdelayed reverse sawtooth", "\U0001f52cpyramid-sigma",
                "\U0001f52cpyramid-sigma inverse", "\U0001f52cgauss-sigma", "\U0001f52cgauss-sigma inverse",
                "\U0001f52crandom"]
_CONTEXT_OPTIONAL = {
    "fuse_method": [FUSE_METHODS],
    "use_on_equal_length": ["BOOLEAN", {"default": False}],
    "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
    "guarantee_steps": ["INT", {"default": 1, "min": 0, "max": 9007199254740991}],
    "prev_context": ["CONTEXT_OPTIONS"],
    "view_opts": ["VIEW_OPTS"],
}
THIRD_PARTY: dict[str, dict[str, Any]] = {
    # animatediff/nodes_gen1.py AnimateDiffLoaderGen1
    "ADE_AnimateDiffLoaderGen1": {
        "pack": "AnimateDiff-Evolved",
        "input": {
            "required": {"model": ["MODEL"], "model_name": [[], {"files": "animatediff_models"}],
                         "beta_schedule": [BETA_SCHEDULES, {"default": "autoselect"}]},
            "optional": {"context_options": ["CONTEXT_OPTIONS"], "motion_lora": ["MOTION_LORA"],
                         "ad_settings": ["AD_SETTINGS"], "ad_keyframes": ["AD_KEYFRAMES"],
                         "sample_settings": ["SAMPLE_SETTINGS"], "scale_multival": ["MULTIVAL"],
                         "effect_multival": ["MULTIVAL"], "per_block": ["PER_BLOCK"]},
        },
        "output": ["MODEL"], "output_name": ["MODEL"],
    },
    # animatediff/nodes_context.py StandardUniformContextOptionsNode
    "ADE_StandardUniformContextOptions": {
        "pack": "AnimateDiff-Evolved",
        "input": {
            "required": {"context_length": ["INT", {"default": 16, "min": 1, "max": 128}],
                         "context_stride": ["INT", {"default": 1, "min": 1, "max": 32}],
                         "context_overlap": ["INT", {"default": 4, "min": 0, "max": 128}]},
            "optional": _CONTEXT_OPTIONAL,
        },
        "output": ["CONTEXT_OPTIONS"], "output_name": ["CONTEXT_OPTS"],
    },
    # adv_control/nodes_sparsectrl.py SparseCtrlLoaderAdvanced
    "ACN_SparseCtrlLoaderAdvanced": {
        "pack": "Advanced-ControlNet",
        "input": {
            "required": {"sparsectrl_name": ["COMBO", {"options": [], "files": "controlnet"}],
                         "use_motion": ["BOOLEAN", {"default": True}],
                         "motion_strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}],
                         "motion_scale": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}]},
            "optional": {"sparse_method": ["SPARSE_METHOD"], "tk_optional": ["TIMESTEP_KEYFRAME"],
                         "context_aware": ["COMBO", {"options": ["nearest_hint", "off"]}],
                         "sparse_hint_mult": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}],
                         "sparse_nonhint_mult": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}],
                         "sparse_mask_mult": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.001}]},
        },
        "output": ["CONTROL_NET"], "output_name": ["CONTROL_NET"],
    },
    # adv_control/nodes_sparsectrl.py SparseIndexMethodNode
    "ACN_SparseCtrlIndexMethodNode": {
        "pack": "Advanced-ControlNet",
        "input": {"required": {"indexes": ["STRING", {"default": "0", "multiline": False}]}},
        "output": ["SPARSE_METHOD"], "output_name": ["SPARSE_METHOD"],
    },
    # adv_control/nodes_sparsectrl.py RgbSparseCtrlPreprocessor
    "ACN_SparseCtrlRGBPreprocessor": {
        "pack": "Advanced-ControlNet",
        "input": {"required": {"image": ["IMAGE"], "vae": ["VAE"], "latent_size": ["LATENT"]}},
        "output": ["IMAGE"], "output_name": ["proc_IMAGE"],
    },
    # adv_control/nodes_main.py AdvancedControlNetApply
    "ACN_AdvancedControlNetApply_v2": {
        "pack": "Advanced-ControlNet",
        "input": {
            "required": {"positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"],
                         "image": ["IMAGE"],
                         "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
                         "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                         "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]},
            "optional": {"mask_optional": ["MASK"], "timestep_kf": ["TIMESTEP_KEYFRAME"],
                         "latent_kf_override": ["LATENT_KEYFRAME"], "weights_override": ["CONTROL_NET_WEIGHTS"],
                         "vae_optional": ["VAE"]},
        },
        "output": ["CONDITIONING", "CONDITIONING"], "output_name": ["positive", "negative"],
    },
}

# --- Files the workflows name --------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    folder: str  # under ComfyUI's models/
    name: str
    what: str
    source: str


MODELS = {m.name: m for m in [
    ModelFile("checkpoints", "realisticVisionV60B1_v51VAE.safetensors",
              "SD1.5 checkpoint (any SD1.5 model works; the official demo uses Realistic Vision V6.0 B1)",
              "Civitai, Realistic Vision V6.0 B1 (or any SD1.5 checkpoint: then pick it in the loader)"),
    ModelFile("id_animator", "animator.ckpt", "ID-Animator face adapter",
              "huggingface.co/spaces/ID-Animator/ID-Animator (animator.ckpt)"),
    ModelFile("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP ViT-H/14 image encoder",
              "huggingface.co/h94/IP-Adapter, models/image_encoder/model.safetensors (rename)"),
    ModelFile("insightface/models", "buffalo_l", "insightface pack (a folder): its face detector; `id_score` and "
              "the UniAnimate workflows also use its recognition model `w600k_r50.onnx`",
              "insightface release buffalo_l.zip, unzipped so the .onnx files sit in models/insightface/models/buffalo_l/"),
    ModelFile("animatediff_models", "mm_sd_v15_v2.ckpt", "AnimateDiff v2 motion module (the one ID-Animator was trained with)",
              "huggingface.co/guoyww/animatediff"),
    ModelFile("animatediff_models", "v3_sd15_mm.ckpt", "AnimateDiff v3 motion module (SparseCtrl's companion)",
              "huggingface.co/guoyww/animatediff"),
    ModelFile("controlnet", "v3_sd15_sparsectrl_rgb.ckpt", "SparseCtrl RGB encoder (scribble: v3_sd15_sparsectrl_scribble.ckpt)",
              "huggingface.co/guoyww/animatediff"),
    ModelFile("controlnet", "control_v11p_sd15_openpose.pth", "ControlNet 1.1 OpenPose for SD1.5",
              "huggingface.co/lllyasviel/ControlNet-v1-1"),
    ModelFile("unianimate", "unianimate_16f_32f_non_ema_223000.pth",
              "UniAnimate video UNet (5.67 GB fp32 pickle, read with weights_only; or its fp16 .safetensors "
              "conversion, see the README). **Research and non-commercial use only**",
              "ModelScope iic/unianimate (the official README's checkpoints/)"),
    ModelFile("vae", "sd21_vae.safetensors", "SD2.1 VAE (the VAE of v2-1_512-ema-pruned.ckpt, which UniAnimate uses)",
              "huggingface.co/stabilityai/stable-diffusion-2-1-base, vae/diffusion_pytorch_model.fp16.safetensors "
              "(rename)"),
    ModelFile("text_encoders", "sd21_text_encoder.safetensors",
              "SD2.1 text encoder (OpenCLIP ViT-H/14 text tower): UniAnimate encodes only the empty prompt with it",
              "huggingface.co/stabilityai/stable-diffusion-2-1-base, text_encoder/model.fp16.safetensors (rename)"),
    ModelFile("dwpose", "yolox_l.onnx", "DWPose person detector (YOLOX-L)", "huggingface.co/yzd-v/DWPose"),
    ModelFile("dwpose", "dw-ll_ucoco_384.onnx", "DWPose whole-body keypoints (RTMPose, 133 points)",
              "huggingface.co/yzd-v/DWPose"),
]}
INPUTS = {  # files in ComfyUI's input/ folder that the workflows name -> what to put there
    "person_a.png": "a clear photo of the person (face at least ~60 px tall)",
    "person_b.png": "a photo of the second person",
    "keyframe.png": "the RGB keyframe (or a sketch, with the scribble SparseCtrl model)",
    "pose.mp4": "an OpenPose skeleton video (e.g. rendered with comfyui_controlnet_aux's DWPose Estimator)",
    "dancer.png": "a photo of the person to animate: one person, whole body, face and hands visible "
                  "(portrait, ideally 2:3 like 512x768)",
    "dance.mp4": "the driving video: a person dancing (any person), the whole body visible in its first frame",
}

# --- The graph description ----------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    """Output `name` of the node keyed `node` (names as in /object_info `output_name`)."""
    node: str
    name: str


@dataclass
class Node:
    key: str
    type: str
    column: int
    inputs: dict[str, Any]  # widget values and links (Out), by input name
    title: str | None = None

    def __getitem__(self, output_name: str) -> Out:
        return Out(self.key, output_name)


@dataclass
class Workflow:
    name: str
    title: str
    summary: str  # one line for the gallery
    note: str  # markdown shown in the workflow's note node
    runs_in_ci: bool = False
    nodes: dict[str, Node] = field(default_factory=dict)

    def add(self, key: str, node_type: str, column: int, title: str | None = None, **inputs: Any) -> Node:
        if key in self.nodes:
            raise ValueError(f"{self.name}: node key {key!r} used twice")
        node = Node(key, node_type, column, inputs, title)
        self.nodes[key] = node
        return node

    def node_types(self) -> set[str]:
        return {n.type for n in self.nodes.values()}

    def files(self) -> list[str]:
        """Model and input files named by widget values, in node order."""
        names = [v for n in self.nodes.values() for v in n.inputs.values() if isinstance(v, str)]
        return list(dict.fromkeys(v for v in names if v in MODELS or v in INPUTS))


# --- Shared pieces (official defaults: ID-Animator infer.py, reference §8) -----------------------
CHECKPOINT = "realisticVisionV60B1_v51VAE.safetensors"
MOTION_V2 = "mm_sd_v15_v2.ckpt"
PROMPT = "a person walking along a beach at sunset, smiling, best quality, high quality, medium shot"
NEGATIVE = ("cartoon, anime, drawing, 3d render, cgi, text, watermark, cropped, out of frame, worst quality, "
            "low quality, blurry, deformed face, extra fingers, bad anatomy")
SEED = 4993  # infer.py
NOTE_MODELS = ("Models: SD1.5 checkpoint in `models/checkpoints/`, `animator.ckpt` in `models/id_animator/`, "
               "CLIP ViT-H/14 in `models/clip_vision/`, an insightface pack (e.g. `buffalo_l`) in "
               "`models/insightface/models/`.")


def identity(wf: Workflow, photo: str = "person_a.png", suffix: str = "", row_title: str = "") -> tuple[Node, Node]:
    """LoadImage -> FaceEncode (+ a preview of the aligned crops); returns (ida, encode)."""
    ida = wf.nodes.get("ida") or wf.add("ida", "LoadIDAnimator", 0, adapter_name="animator.ckpt",
                                        clip_vision_name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
                                        face_detector="buffalo_l", provider="auto")
    photo_node = wf.add(f"photo{suffix}", "LoadImage", 0, title=f"Reference photo{row_title}", image=photo)
    encode = wf.add(f"encode{suffix}", "FaceEncode", 1, id_animator=ida["id_animator"], image=photo_node["IMAGE"],
                    face_select="most confident", face_index=0, on_no_face="error")
    wf.add(f"crops{suffix}", "PreviewImage", 2, title=f"Aligned face{row_title}", images=encode["face_crops"])
    return ida, encode


def sampling(wf: Workflow, model: Out, frames: int, positive: Out | None = None, negative: Out | None = None,
             video: bool = True, prefix: str = "id_animator/video") -> None:
    """Prompts, empty latent, KSampler with the official settings, decode and save."""
    ckpt = wf.nodes["ckpt"]
    if positive is None:
        positive = wf.add("positive", "CLIPTextEncode", 2, title="Prompt", clip=ckpt["CLIP"], text=PROMPT)["CONDITIONING"]
        negative = wf.add("negative", "CLIPTextEncode", 2, title="Negative prompt", clip=ckpt["CLIP"],
                          text=NEGATIVE)["CONDITIONING"]
    latent = wf.nodes.get("latent") or wf.add("latent", "EmptyLatentImage", 3, width=512, height=512,
                                              batch_size=frames)
    sampler = wf.add("sampler", "KSampler", 4, model=model, positive=positive, negative=negative,
                     latent_image=latent["LATENT"], seed=SEED, control_after_generate="fixed", steps=30, cfg=8.0,
                     sampler_name="ddim", scheduler="ddim_uniform", denoise=1.0)
    decode = wf.add("decode", "VAEDecode", 5, samples=sampler["LATENT"], vae=ckpt["VAE"])
    if video:
        clip = wf.add("video", "CreateVideo", 5, images=decode["IMAGE"], fps=8.0, bit_depth=8)
        wf.add("save", "SaveVideo", 6, video=clip["VIDEO"], filename_prefix=prefix, format="mp4", codec="auto")
    else:
        wf.add("save", "SaveImage", 6, images=decode["IMAGE"], filename_prefix=prefix)


def animate(wf: Workflow, model: Out, motion: str = MOTION_V2, context: Out | None = None) -> Out:
    """AnimateDiff-Evolved Gen1 loader with the beta schedule ID-Animator was trained with (§7.3)."""
    extra = {"context_options": context} if context is not None else {}
    return wf.add("animatediff", "ADE_AnimateDiffLoaderGen1", 3, model=model, model_name=motion,
                  beta_schedule="sqrt_linear (AnimateDiff)", **extra)["MODEL"]


def video_workflow(name: str, title: str, summary: str, note: str) -> tuple[Workflow, Node]:
    wf = Workflow(name, title, summary, note)
    wf.add("note", "MarkdownNote", 0, title="Read me", text=note)
    ckpt = wf.add("ckpt", "CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    return wf, ckpt


def apply(wf: Workflow, model: Out, ida: Node, embeds: Out) -> Out:
    return wf.add("apply", "ApplyFaceAdapter", 2, model=model, id_animator=ida["id_animator"], face_embeds=embeds,
                  weight=0.8, start_at=0.0, end_at=1.0, lora_strength=1.0)["model"]


# --- The workflows --------------------------------------------------------------------------


def id_video_basic() -> Workflow:
    wf, ckpt = video_workflow(
        "id_video_basic", "ID-Animator: one photo to a video",
        "One face photo to a 16-frame 512x512 video (official settings).",
        "# One photo -> a video of that person\n"
        "1. Load your photo in **Reference photo** (one clear face). The aligned crop shows what is encoded.\n"
        "2. Write the prompt. 16 frames at 512x512, 30 DDIM steps, cfg 8, face weight 0.8 are the official "
        "settings.\n"
        "3. **weight** on Apply Face Adapter: lower (0.5-0.7) gives the prompt more room, above ~1.2 over-bakes.\n\n"
        f"{NOTE_MODELS} Motion: `mm_sd_v15_v2.ckpt` in `models/animatediff_models/` "
        "(AnimateDiff-Evolved).")
    ida, encode = identity(wf)
    model = animate(wf, apply(wf, ckpt["MODEL"], ida, encode["face_embeds"]))
    sampling(wf, model, frames=16, prefix="id_animator/basic")
    return wf


def two_identities(wf: Workflow, blend: float, blend_end: float) -> Out:
    _, encode_a = identity(wf, "person_a.png", "_a", " A")
    _, encode_b = identity(wf, "person_b.png", "_b", " B")
    return wf.add("mix", "IDMix", 2, embeds_a=encode_a["face_embeds"], embeds_b=encode_b["face_embeds"],
                  blend=blend, blend_end=blend_end)["face_embeds"]


def id_mix() -> Workflow:
    wf, ckpt = video_workflow(
        "id_mix", "ID-Animator: mix two identities",
        "Two people blended into one face with the IDMix slider.",
        "# Mix two identities\n"
        "Load person A and person B. **blend** on ID Mix: 0 = only A, 1 = only B, 0.5 = an even mix.\n"
        "Chain another ID Mix to add a third person. Several photos of ONE person go into one Face Encode "
        "as a batch (they are averaged) instead.\n\n"
        f"{NOTE_MODELS} Motion: `mm_sd_v15_v2.ckpt` (AnimateDiff-Evolved).")
    mixed = two_identities(wf, blend=0.5, blend_end=-1.0)
    model = animate(wf, apply(wf, ckpt["MODEL"], wf.nodes["ida"], mixed))
    sampling(wf, model, frames=16, prefix="id_animator/mix")
    return wf


def id_morph() -> Workflow:
    wf, ckpt = video_workflow(
        "id_morph", "ID-Animator: morph one identity into another",
        "Person A turns into person B from the first frame to the last.",
        "# Morph A into B\n"
        "ID Mix goes from **blend** (0 = A) at the first frame to **blend_end** (1 = B) at the last frame. "
        "blend_end = -1 turns the morph off. Try 0.2 -> 0.8 for a subtler change.\n\n"
        f"{NOTE_MODELS} Motion: `mm_sd_v15_v2.ckpt` (AnimateDiff-Evolved).")
    mixed = two_identities(wf, blend=0.0, blend_end=1.0)
    model = animate(wf, apply(wf, ckpt["MODEL"], wf.nodes["ida"], mixed))
    sampling(wf, model, frames=16, prefix="id_animator/morph")
    return wf


def id_sparsectrl() -> Workflow:
    wf, ckpt = video_workflow(
        "id_sparsectrl", "ID-Animator with SparseCtrl",
        "The identity plus a keyframe (RGB image or sketch) through SparseCtrl.",
        "# Identity + a SparseCtrl keyframe\n"
        "**Keyframe** is placed at the frames listed in SparseCtrl Index Method (`0` = first frame; "
        "`0,15` = first and last, with a batch of two images).\n"
        "For a sketch: load `v3_sd15_sparsectrl_scribble.ckpt`, bypass RGB SparseCtrl and connect the "
        "sketch straight to Apply Advanced ControlNet.\n"
        "SparseCtrl was trained with the AnimateDiff v3 motion module (`v3_sd15_mm.ckpt`); ID-Animator "
        "with v2 (`mm_sd_v15_v2.ckpt`): switch if the face matters more than the keyframe.\n\n"
        f"{NOTE_MODELS} SparseCtrl model in `models/controlnet/` (Advanced-ControlNet).")
    ida, encode = identity(wf)
    keyframe = wf.add("keyframe", "LoadImage", 0, title="Keyframe", image="keyframe.png")
    sparse_method = wf.add("sparse_index", "ACN_SparseCtrlIndexMethodNode", 1, indexes="0")
    sparsectrl = wf.add("sparsectrl", "ACN_SparseCtrlLoaderAdvanced", 1, sparsectrl_name="v3_sd15_sparsectrl_rgb.ckpt",
                        use_motion=True, motion_strength=1.0, motion_scale=1.0,
                        sparse_method=sparse_method["SPARSE_METHOD"], context_aware="nearest_hint",
                        sparse_hint_mult=1.0, sparse_nonhint_mult=1.0, sparse_mask_mult=1.0)
    latent = wf.add("latent", "EmptyLatentImage", 3, width=512, height=512, batch_size=16)
    rgb = wf.add("rgb", "ACN_SparseCtrlRGBPreprocessor", 2, image=keyframe["IMAGE"], vae=ckpt["VAE"],
                 latent_size=latent["LATENT"])
    positive = wf.add("positive", "CLIPTextEncode", 2, title="Prompt", clip=ckpt["CLIP"], text=PROMPT)
    negative = wf.add("negative", "CLIPTextEncode", 2, title="Negative prompt", clip=ckpt["CLIP"], text=NEGATIVE)
    control = wf.add("control", "ACN_AdvancedControlNetApply_v2", 3, positive=positive["CONDITIONING"],
                     negative=negative["CONDITIONING"], control_net=sparsectrl["CONTROL_NET"], image=rgb["proc_IMAGE"],
                     strength=1.0, start_percent=0.0, end_percent=1.0)
    model = animate(wf, apply(wf, ckpt["MODEL"], ida, encode["face_embeds"]), motion="v3_sd15_mm.ckpt")
    sampling(wf, model, frames=16, positive=control["positive"], negative=control["negative"],
             prefix="id_animator/sparsectrl")
    return wf


def id_long_video() -> Workflow:
    wf, ckpt = video_workflow(
        "id_long_video", "ID-Animator: long video with context windows",
        "64 frames through AnimateDiff-Evolved context windows (16 frames each, overlap 4).",
        "# A long video\n"
        "AnimateDiff sees 16 frames at a time; the context options slide a 16-frame window with an overlap "
        "of 4 over all 64 frames. The identity applies to every window.\n"
        "Change the length in **Empty Latent Image** (batch_size = frames). More overlap = smoother, slower.\n\n"
        f"{NOTE_MODELS} Motion: `mm_sd_v15_v2.ckpt` (AnimateDiff-Evolved).")
    ida, encode = identity(wf)
    context = wf.add("context", "ADE_StandardUniformContextOptions", 3, context_length=16, context_stride=1,
                     context_overlap=4, fuse_method="pyramid", use_on_equal_length=False, start_percent=0.0,
                     guarantee_steps=1)
    model = animate(wf, apply(wf, ckpt["MODEL"], ida, encode["face_embeds"]), context=context["CONTEXT_OPTS"])
    sampling(wf, model, frames=64, prefix="id_animator/long")
    return wf


def id_pose() -> Workflow:
    wf, ckpt = video_workflow(
        "id_pose", "ID-Animator: pose-driven video",
        "The reference person follows an OpenPose sequence (OpenPose ControlNet on any SD1.5 checkpoint).",
        "# Pose-driven\n"
        "**Pose video**: an OpenPose skeleton video (render one from a dance clip with comfyui_controlnet_aux's "
        "DWPose Estimator). Get Image From Batch takes 16 frames from `batch_index`; keep its length equal to "
        "the latent batch_size.\n"
        "Lower the ControlNet **strength** (0.6-0.8) if the face loses detail.\n\n"
        f"{NOTE_MODELS} `control_v11p_sd15_openpose.pth` in `models/controlnet/`; motion `mm_sd_v15_v2.ckpt` "
        "(AnimateDiff-Evolved).")
    ida, encode = identity(wf)
    pose_video = wf.add("pose_video", "LoadVideo", 0, title="Pose video", file="pose.mp4")
    frames = wf.add("pose_frames", "GetVideoComponents", 1, video=pose_video["VIDEO"])
    poses = wf.add("poses", "ImageFromBatch", 1, image=frames["images"], batch_index=0, length=16)
    wf.add("pose_preview", "PreviewImage", 2, title="Poses", images=poses["IMAGE"])
    controlnet = wf.add("openpose", "ControlNetLoader", 1, control_net_name="control_v11p_sd15_openpose.pth")
    positive = wf.add("positive", "CLIPTextEncode", 2, title="Prompt", clip=ckpt["CLIP"], text=PROMPT)
    negative = wf.add("negative", "CLIPTextEncode", 2, title="Negative prompt", clip=ckpt["CLIP"], text=NEGATIVE)
    control = wf.add("control", "ControlNetApplyAdvanced", 3, positive=positive["CONDITIONING"],
                     negative=negative["CONDITIONING"], control_net=controlnet["CONTROL_NET"], image=poses["IMAGE"],
                     strength=1.0, start_percent=0.0, end_percent=1.0)
    model = animate(wf, apply(wf, ckpt["MODEL"], ida, encode["face_embeds"]))
    sampling(wf, model, frames=16, positive=control["positive"], negative=control["negative"],
             prefix="id_animator/pose")
    return wf


def id_image() -> Workflow:
    wf, ckpt = video_workflow(
        "id_image", "ID-Animator: identity-preserving still image",
        "A still image of the person from SD1.5 alone (no AnimateDiff needed).",
        "# A still image of the person\n"
        "Core ComfyUI and this pack only: no motion module. Useful to check the identity and the prompt "
        "quickly before rendering a video.\n"
        "Raise **batch_size** in Empty Latent Image for several variations.\n\n" + NOTE_MODELS)
    wf.runs_in_ci = True
    ida, encode = identity(wf)
    model = apply(wf, ckpt["MODEL"], ida, encode["face_embeds"])
    sampling(wf, model, frames=1, video=False, prefix="id_animator/image")
    return wf


def id_score() -> Workflow:
    wf, ckpt = video_workflow(
        "id_score", "ID-Animator: render and score the identity",
        "A 16-frame video of the person, scored frame by frame: face similarity, faces found, stability.",
        "# Render, then measure the identity\n"
        "**Face Similarity** compares the face in every generated frame with the reference photo (ArcFace "
        "cosine with the insightface pack's recognition model, `w600k_r50.onnx` in buffalo_l, which **Load face "
        "scorer** loads once; it reuses Load ID-Animator's face detector). Its plot shows "
        "the score per frame; frames where no face was found are marked with a red x and left out of the "
        "mean. **stability** is how alike the faces of consecutive frames are.\n"
        "Change **weight** on Apply Face Adapter or the prompt, queue again and compare the numbers. Scores "
        "from different recognition models (buffalo_l vs antelopev2) are not comparable.\n\n"
        f"{NOTE_MODELS} Motion: `mm_sd_v15_v2.ckpt` (AnimateDiff-Evolved).")
    ida, encode = identity(wf)
    model = animate(wf, apply(wf, ckpt["MODEL"], ida, encode["face_embeds"]))
    sampling(wf, model, frames=16, prefix="id_animator/score")
    # the scorer reuses the detector Load ID-Animator holds: one detector for encoding and scoring
    scorer = wf.add("scorer", "IDA_LoadFaceScorer", 5, title="Load face scorer", insightface_pack="buffalo_l",
                    provider="auto", id_animator=ida["id_animator"])
    score = wf.add("score", "FaceSimilarity", 6, title="Face similarity", reference=wf.nodes["photo"]["IMAGE"],
                   frames=wf.nodes["decode"]["IMAGE"], face_scorer=scorer["face_scorer"], frame_face="largest")
    wf.add("mean", "PreviewAny", 7, title="Mean face similarity", source=score["mean_score"])
    return wf


# --- UniAnimate (issue 21; reference: shared/reference/unianimate-official.md) --------------------
UNIANIMATE = "unianimate_16f_32f_non_ema_223000.pth"
SD21_VAE, SD21_TEXT = "sd21_vae.safetensors", "sd21_text_encoder.safetensors"
UNIANIMATE_SEED = 11  # the official configs' seed
NOTE_UNIANIMATE_MODELS = (
    "Models: `unianimate_16f_32f_non_ema_223000.pth` in `models/unianimate/` (research and non-commercial use "
    "only), the SD2.1 VAE in `models/vae/` and text encoder in `models/text_encoders/`, CLIP ViT-H/14 in "
    "`models/clip_vision/`, `yolox_l.onnx` and `dw-ll_ucoco_384.onnx` in `models/dwpose/`, an insightface pack "
    "(e.g. `buffalo_l`, for the score) in `models/insightface/models/`. Have the whole SD2.1 checkpoint "
    "(`v2-1_512-ema-pruned.ckpt`)? A Load Checkpoint node's VAE and CLIP can replace the two loaders, at the cost "
    "of also loading its UNet (865 M parameters) for nothing.")


def unianimate(wf: Workflow, frames: int, long_video: bool = False, segments: int = 1) -> None:
    """Reference photo + dance video -> aligned poses -> UniAnimate sampled as the official DDIM
    (KSamplerAdvanced, ddim_uniform + euler, cfg 2.5, the noise prior in the latent) -> decode, save,
    and the reference face scored in every frame (issue 21 items 5 and 6). With `segments` > 1 the
    video is continued from its last frame: each further segment of `frames` frames takes the
    previous segment's last frame as its reference image and that frame's pose as its reference pose
    (the official README's tip for long videos, beside the windows)."""
    wf.add("note", "MarkdownNote", 0, title="Read me", text=wf.note)
    model = wf.add("unianimate", "LoadUniAnimate", 0, unet_name=UNIANIMATE, weight_dtype="default")["model"]
    # the SD2.1 VAE and text encoder on their own: a Load Checkpoint would load the SD2.1 UNet too
    vae = wf.add("vae", "VAELoader", 0, title="SD2.1 VAE", vae_name=SD21_VAE)["VAE"]
    text = wf.add("text_encoder", "CLIPLoader", 0, title="SD2.1 text encoder", clip_name=SD21_TEXT,
                  type="stable_diffusion", device="default")["CLIP"]
    vision = wf.add("clip_vision", "CLIPVisionLoader", 0, clip_name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    dwpose = wf.add("dwpose", "IDA_LoadDWPose", 0, detector="yolox_l.onnx", pose_model="dw-ll_ucoco_384.onnx",
                    provider="auto")
    photo = wf.add("photo", "LoadImage", 1, title="Reference photo", image="dancer.png")
    video = wf.add("dance", "LoadVideo", 1, title="Dance video", file="dance.mp4")
    components = wf.add("dance_frames", "GetVideoComponents", 1, video=video["VIDEO"])
    driving = wf.add("driving", "ImageFromBatch", 1, title="Driving frames", image=components["images"],
                     batch_index=0, length=frames * segments)
    # one alignment for the whole video, to the photo's body: every segment's poses stay on one scale
    pose = wf.add("pose", "UniAnimatePose", 2, dwpose=dwpose["dwpose"], reference_image=photo["IMAGE"],
                  driving_frames=driving["IMAGE"], alignment="official, missing bones kept",
                  missing_person="black frame", width=512, height=768)
    wf.add("pose_preview", "PreviewImage", 2, title="Aligned poses", images=pose["pose_frames"])
    if long_video:
        model = wf.add("windows", "UniAnimateContextWindows", 2, model=model, context_length=32,
                       context_overlap=8)["model"]
    reference_image, reference_pose, previous = photo["IMAGE"], pose["reference_pose"], None
    for segment in range(segments):
        suffix, row = ("", "") if segment == 0 else (f"_{segment + 1}", f" {segment + 1}")
        pose_frames = pose["pose_frames"]
        if segments > 1:
            pose_frames = wf.add(f"poses{suffix}", "ImageFromBatch", 3, title=f"Segment {segment + 1} poses",
                                 image=pose_frames, batch_index=segment * frames, length=frames)["IMAGE"]
        cond = wf.add(f"conditioning{suffix}", "UniAnimateConditioning", 3, reference_image=reference_image,
                      pose_frames=pose_frames, reference_pose=reference_pose, vae=vae, clip=text,
                      clip_vision=vision["CLIP_VISION"], mode="randomref",
                      start="noise prior (long video)" if long_video else "noise prior", seed=UNIANIMATE_SEED,
                      control_after_generate="fixed", steps=30)
        sampler = wf.add(f"sampler{suffix}", "KSamplerAdvanced", 4, model=model, add_noise="disable",
                         noise_seed=UNIANIMATE_SEED, control_after_generate="fixed", steps=30, cfg=2.5,
                         sampler_name="euler", scheduler="ddim_uniform", positive=cond["positive"],
                         negative=cond["negative"], latent_image=cond["latent"], start_at_step=0,
                         end_at_step=10000, return_with_leftover_noise="disable")
        latent_frames = wf.add(f"latent_frames{suffix}", "UniAnimateLatentFrames", 5, samples=sampler["LATENT"],
                               **({} if previous is None else {"previous": previous}))
        previous = latent_frames["frames"]
        if segment + 1 < segments:  # the next segment starts from this one's last frame and its pose
            last = wf.add(f"last_latent{suffix}", "LatentFromBatch", 5, title=f"Last frame{row}",
                          samples=previous, batch_index=-1, length=1)
            reference_image = wf.add(f"last_frame{suffix}", "VAEDecode", 5, samples=last["LATENT"], vae=vae)["IMAGE"]
            reference_pose = wf.add(f"last_pose{suffix}", "ImageFromBatch", 3, title=f"Last pose{row}",
                                    image=pose["pose_frames"], batch_index=(segment + 1) * frames - 1,
                                    length=1)["IMAGE"]
    decode = wf.add("decode", "VAEDecode", 5, samples=previous, vae=vae)
    clip = wf.add("video", "CreateVideo", 6, images=decode["IMAGE"], fps=8.0, bit_depth=8)  # official save_fps
    wf.add("save", "SaveVideo", 7, video=clip["VIDEO"], filename_prefix=f"id_animator/{wf.name}", format="mp4",
           codec="auto")
    scorer = wf.add("scorer", "IDA_LoadFaceScorer", 6, title="Load face scorer", insightface_pack="buffalo_l",
                    provider="auto")
    score = wf.add("score", "FaceSimilarity", 7, title="Face similarity", reference=photo["IMAGE"],
                   frames=decode["IMAGE"], face_scorer=scorer["face_scorer"], frame_face="largest")
    wf.add("mean", "PreviewAny", 8, title="Mean face similarity", source=score["mean_score"])


UNIANIMATE_STEPS = (
    "\nThe sampler is the official DDIM: KSamplerAdvanced with add_noise disable (the starting noise is in the "
    "latent, with the reference in it: the noise prior), 30 steps, cfg 2.5, euler + ddim_uniform; keep "
    "**steps** on UniAnimate Conditioning equal to the sampler's.\n"
    "**Face Similarity** scores the reference face in every frame (ArcFace cosine): how much of the person "
    "survives. Frames without a face are marked, not scored 0.\n\n")


def unianimate_dance() -> Workflow:
    wf = Workflow(
        "unianimate_dance", "UniAnimate: a photo of a person dancing",
        "A reference photo and a dance video give 32 frames at 512x768 of that person (face, body, clothes, "
        "background) doing that dance, scored for identity.",
        "# This person, that dance (UniAnimate)\n"
        "1. **Reference photo**: the person to animate, whole body visible. It is stretched to the pose size "
        "(512x768: use a 2:3 portrait).\n"
        "2. **Dance video**: anyone dancing; **Driving frames** takes 32 frames from `batch_index` (UniAnimate "
        "was trained on 16 and 32). The official demos take every 2nd frame of a 30 fps clip: use a 15 fps clip "
        "for the same speed. Its first frame sets the pose alignment: whole body, face and hands visible.\n"
        "3. **UniAnimate Pose** finds the poses (DWPose), rescales them to the reference body and draws them; "
        "check them in **Aligned poses**.\n"
        + UNIANIMATE_STEPS + NOTE_UNIANIMATE_MODELS)
    unianimate(wf, frames=32, long_video=False)
    return wf


def unianimate_long() -> Workflow:
    wf = Workflow(
        "unianimate_long", "UniAnimate: a long dance video with context windows",
        "64 frames (any length) through sliding windows of 32 frames overlapping by 8, each with the reference "
        "frame, as the official long-video sampler does; scored for identity.",
        "# A long dance (UniAnimate, sliding windows)\n"
        "**UniAnimate Context Windows** slides windows of 32 frames, overlapping by 8, over all the frames (the "
        "official long-video settings; the last window ends at the last frame). Every window sees the reference "
        "frame, so the person stays the same from window to window; more overlap (16) when the appearance "
        "drifts.\n"
        "Change the length in **Driving frames** (`length`); the start is the long-video noise prior.\n"
        + UNIANIMATE_STEPS + NOTE_UNIANIMATE_MODELS)
    unianimate(wf, frames=64, long_video=True)
    return wf


def unianimate_continue() -> Workflow:
    wf = Workflow(
        "unianimate_continue", "UniAnimate: a longer dance, continued from the last frame",
        "Two 32-frame segments: the second starts from the first one's last frame and pose, so 64 frames come "
        "out of two ordinary 32-frame runs; scored for identity.",
        "# A dance continued from its last frame (UniAnimate)\n"
        "The other way to a long video, beside the sliding windows of `unianimate_long`: render 32 frames, then "
        "the next 32 with the **last frame** as the reference photo and **the pose it was rendered with** as the "
        "reference pose. Each run is an ordinary 32-frame run, with the memory of `unianimate_dance`. Unlike the "
        "windows, segment 2 never sees the photo, so details drift a little with every segment: the score "
        "shows how much.\n"
        "**Driving frames** takes 64 frames; **UniAnimate Pose** aligns them all to the photo's body once; "
        "**Segment 1 poses** and **Segment 2 poses** take 32 each (`batch_index` 0 and 32), and **Last pose** "
        "(`batch_index` 31) is the pose of segment 1's last frame. Segment 2's **UniAnimate Latent to Frames** "
        "puts segment 1's frames first (`previous`), so one decode makes the whole video.\n"
        "A third segment: copy the nodes from **Last frame** to segment 2's **UniAnimate Latent to Frames**, paste "
        "them (Ctrl+Shift+V keeps their inputs), connect segment 2's `frames` to the copies' **Last frame** and "
        "`previous`, add 32 to every `batch_index` and take 96 driving frames.\n"
        + UNIANIMATE_STEPS + NOTE_UNIANIMATE_MODELS)
    unianimate(wf, frames=32, segments=2)
    return wf


WORKFLOWS: list[Callable[[], Workflow]] = [id_video_basic, id_mix, id_morph, id_sparsectrl, id_long_video, id_pose,
                                           id_image, id_score, unianimate_dance, unianimate_long,
                                           unianimate_continue]


def all_workflows() -> list[Workflow]:
    return [make() for make in WORKFLOWS]
