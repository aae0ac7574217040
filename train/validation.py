"""Validation while training: every `--validate-every` steps, videos rendered with the current
adapter for held-out faces and prompts, scored with the pack's scorer (train/score.py).

The videos are rendered in diffusers (`AnimateDiffPipeline`, DDIM η=0 on AnimateDiff's betas, as
the official inference: official §7.3) on the trainer's own frozen models: the UNet with the
motion module that carries the adapter's processors (train/model.py), the text encoder and the
image encoder. Only the VAE is loaded in addition (latents are cached, so training has none).
The context is the official one, [text ‖ face tokens] for the prompt and [negative text ‖ null
face tokens] for the uncond pass (`FaceAdapter.encoder_hidden_states`); the processors on the
UNet compute the same maths as training and the nodes (adapter/face_attention.py).

Scores per video: ArcFace face similarity to the reference photo (frames without a face are
left out, never scored 0), CLIP-I (the frozen ViT-H/14's `image_embeds`), the share of frames
with a face; the row of a validation holds the mean of its videos (`score.mean_of_videos`).

Training is not disturbed: rendering runs under `no_grad` with the adapter in eval mode (its mode
restored after), inside `torch.random.fork_rng` (the CPU and CUDA generators come back as they
were), with its own DDIM scheduler and seeded noise (the same initial noise at every validation,
so videos of two steps differ only by the adapter). Gradient checkpointing only acts when a
gradient is recorded, so it needs no switching. Under several processes, the main process renders
and writes while the others wait.

RUN_DIR: `validation.jsonl` (one row per validation: step, face_similarity, clip_i, face_share,
seconds, videos), `validation.png` (identity against step, beside loss.png),
`validation/step-<n>/<k>-<face>.gif`; TensorBoard (`--report-to tensorboard`): the three scalars
under `validation/` and each video's frames as images.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adapter.clip_image import CLIP_SIZE, mean_colour
from ..adapter.errors import IDAnimatorError, TrainingError
from ..adapter.files import append_jsonl, atomic_path, read_jsonl, write_atomic
from .score import PROVIDERS
from .sd15 import clip_penultimate, encode_prompts

logger = logging.getLogger(__name__)

LOG = "validation.jsonl"
PLOT = "validation.png"
FOLDER = "validation"
SCORES = ("face_similarity", "clip_i", "face_share")  # the row's means, plotted and sent to TensorBoard
DEFAULT_PROMPT = "a person talking and smiling, looking at the camera, medium shot, best quality"
# FaceAdapterPlusForVideoLora.generate's default negative prompt (official §8)
DEFAULT_NEGATIVE = "monochrome, lowres, bad anatomy, worst quality, low quality"
GIF_FPS = 8  # the official demo saves at 9 fps; 8 keeps GIF frame times exact (12.5 cs -> 125 ms)


# --- Settings ---------------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    """The `train` command's validation options."""
    group = parser.add_argument_group(
        "validation while training", "render short videos for held-out faces every N steps and score "
        "their identity (validation.jsonl, validation.png, TensorBoard); off by default")
    group.add_argument("--validate-every", type=int, default=0, metavar="N",
                       help="validate every N optimizer steps and at the last step (default 0: off)")
    group.add_argument("--validate-at-start", action="store_true",
                       help="also validate before the first step (step 0: the --init adapter, e.g. IP-Adapter-Plus), "
                       "a baseline for the plot; not again on --resume")
    group.add_argument("--validation-faces", nargs="+", type=Path, metavar="PHOTO",
                       help="held-out reference photos (people the training set does not show), or folders "
                       "of them: each photo is one identity, cropped as FaceEncode crops it")
    group.add_argument("--validation-prompts", nargs="+", metavar="PROMPT",
                       help="prompts, or .txt files with one prompt per line (default: one neutral prompt); "
                       "K = max(faces, prompts) videos, the shorter list repeated")
    group.add_argument("--validation-negative-prompt", default=DEFAULT_NEGATIVE, metavar="TEXT",
                       help=f"negative prompt of classifier-free guidance (default: the official '{DEFAULT_NEGATIVE}')")
    group.add_argument("--validation-pack", type=Path, metavar="DIR",
                       help="insightface pack with a detector and a recognition model (models/insightface/models/"
                       "buffalo_l): crops the faces and scores face similarity (required with --validate-every)")
    group.add_argument("--validation-provider", default="cpu", type=str.lower, choices=list(PROVIDERS),
                       help="onnxruntime provider of the pack (default cpu: leaves the GPU to training)")
    group.add_argument("--validation-frames", type=int, metavar="N", default=16, help="frames per video (default 16)")
    group.add_argument("--validation-steps", type=int, metavar="N", default=25,
                       help="DDIM steps per video (default 25; the official demo uses 30)")
    group.add_argument("--validation-size", type=int, metavar="PX", default=512,
                       help="width and height in pixels, a multiple of 64 (default 512)")
    group.add_argument("--validation-guidance", type=float, metavar="SCALE", default=8.0,
                       help="classifier-free guidance scale (default 8, the official demo's; 1 or less: none)")
    group.add_argument("--validation-seed", type=int, metavar="SEED", default=0,
                       help="video k starts from noise seeded with seed + k, the same at every validation")


@dataclass(frozen=True)
class Settings:
    every: int
    at_start: bool
    faces: tuple[Path, ...]
    prompts: tuple[str, ...]
    negative_prompt: str
    pack: Path
    provider: str
    frames: int
    steps: int
    size: int
    guidance: float
    seed: int

    @property
    def videos(self) -> list[tuple[Path, str]]:
        """(face photo, prompt) of each of the K = max(faces, prompts) videos."""
        count = max(len(self.faces), len(self.prompts))
        return [(self.faces[k % len(self.faces)], self.prompts[k % len(self.prompts)]) for k in range(count)]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def face_photos(paths: list[Path]) -> tuple[Path, ...]:
    """Photos and the photos of folders (sorted by name), in the order given."""
    photos: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise TrainingError(f"--validation-faces {path}: the folder holds no photo "
                                    f"({', '.join(IMAGE_SUFFIXES)}).")
            photos += found
        elif path.is_file():
            photos.append(path)
        else:
            raise TrainingError(f"--validation-faces {path}: no such photo or folder.")
    return tuple(photos)


def prompts_of(values: list[str] | None) -> tuple[str, ...]:
    """Prompts given as text, or .txt files of one prompt per line (empty lines skipped)."""
    prompts: list[str] = []
    for value in values or [DEFAULT_PROMPT]:
        path = Path(value)
        if value.endswith(".txt"):
            if not path.is_file():
                raise TrainingError(f"--validation-prompts {value}: no such file (a .txt value is read as a "
                                    f"file of prompts, one per line).")
            prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            prompts.append(value)
    if not prompts:
        raise TrainingError(f"--validation-prompts {' '.join(values or [])}: no prompt found.")
    return tuple(prompts)


def settings_of(args: argparse.Namespace) -> Settings | None:
    """The validation settings of the `train` arguments; None when validation is off."""
    every = getattr(args, "validate_every", 0) or 0
    if every < 0:
        raise TrainingError(f"--validate-every is {every}; give 0 (off) or a number of steps.")
    if every == 0:
        return None
    if not args.validation_faces:
        raise TrainingError("--validate-every needs --validation-faces: photos of people the training set does "
                            "not show (held out), one identity per photo.")
    if args.validation_pack is None:
        raise TrainingError("--validate-every needs --validation-pack: an insightface pack folder with a detector "
                            "and a recognition model (models/insightface/models/buffalo_l), which crops the "
                            "faces and scores the videos.")
    for flag, value in (("--validation-frames", args.validation_frames), ("--validation-steps", args.validation_steps),
                        ("--validation-size", args.validation_size)):
        if value < 1:
            raise TrainingError(f"{flag} is {value}; give a positive number.")
    return Settings(every=every, at_start=args.validate_at_start, faces=face_photos(args.validation_faces),
                    prompts=prompts_of(args.validation_prompts), negative_prompt=args.validation_negative_prompt,
                    pack=args.validation_pack, provider=args.validation_provider, frames=args.validation_frames,
                    steps=args.validation_steps,
                    size=args.validation_size, guidance=args.validation_guidance, seed=args.validation_seed)


# --- Models --------------------------------------------------------------------------------------


def load_vae(checkpoint: str | Path, *, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """The checkpoint's VAE (the one model training does not load), frozen: from the SD1.5 single
    file, or the `vae/` folder of a diffusers SD1.5 folder."""
    from .loop import freeze

    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        from diffusers import AutoencoderKL

        if not (checkpoint / "vae" / "config.json").is_file():
            raise TrainingError(f"{checkpoint} has no vae/ folder: validation decodes its videos with the "
                                f"checkpoint's VAE (a diffusers SD1.5 folder has vae/config.json and its weights).")
        vae = AutoencoderKL.from_pretrained(checkpoint / "vae", local_files_only=True)
    else:
        from .sd15 import load_vae as load_single_file_vae

        vae = load_single_file_vae(checkpoint, dtype=dtype, device=device)
    return freeze(vae, device, dtype)


def sampling_scheduler(training_scheduler: Any) -> Any:
    """DDIM η=0 on the training schedule's betas, `steps_offset` 1: the official inference
    scheduler (official §7.3). Its own object: sampling never touches the training scheduler."""
    from diffusers import DDIMScheduler

    config = training_scheduler.config
    return DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_start=config.beta_start,
                         beta_end=config.beta_end, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, steps_offset=1, clip_sample=False)


@dataclass
class Face:
    """A held-out identity, prepared once: the frozen image encoder's features of its photo's
    official crop (the Resampler's input) and the scorer's references."""

    photo: Path
    features: Tensor  # (1, 257, E): CLIP penultimate states of the crop
    references: Any  # score.References


# --- The validator ---------------------------------------------------------------------------------


class Validator:
    """Renders and scores the validation videos; `due(step)` says when, `run(adapter, step)` does it.

    Built on every process (cheap on the others: nothing is loaded there), so that every process
    reaches the same `wait_for_everyone`."""

    def __init__(self, settings: Settings, accelerator: Any, frozen: Any, checkpoint: str | Path, out: Path,
                 dtype: torch.dtype, max_steps: int) -> None:
        self.settings, self.accelerator, self.frozen = settings, accelerator, frozen
        self.out, self.max_steps = Path(out), max_steps
        self.main = accelerator.is_main_process
        if accelerator.distributed_type == "FSDP":  # accelerate DistributedType, a str enum
            raise TrainingError("--validate-every does not run under FSDP (the adapter's tensors are sharded, and "
                                "only the main process renders); use DDP or DeepSpeed ZeRO-2 (train/configs/).")
        multiple = 8 * 2 ** (len(frozen.unet.config.block_out_channels) - 1)  # VAE x UNet downsampling
        if settings.size % multiple:
            raise TrainingError(f"--validation-size {settings.size} is not a multiple of {multiple} (the VAE's 8 "
                                f"times the UNet's downsampling).")
        self.faces: list[Face] = []
        if self.main:
            self._load(checkpoint, dtype)
        accelerator.wait_for_everyone()

    def _load(self, checkpoint: str | Path, dtype: torch.dtype) -> None:
        from diffusers import AnimateDiffPipeline

        from ..adapter.face_detection import FaceDetector, detect_and_align
        from ..adapter.face_recognition import FaceRecognizer, detector_function
        from .score import ClipImage, Models, References, onnx_providers, read_image

        frozen, device = self.frozen, self.accelerator.device
        providers = onnx_providers(self.settings.provider)
        try:
            detector = FaceDetector(self.settings.pack, providers)
            self.models = Models(detector_function(detector), FaceRecognizer(self.settings.pack, providers),
                                 ClipImage(frozen.image_encoder))
        except IDAnimatorError as error:
            raise TrainingError(f"--validation-pack {self.settings.pack}: {error}") from error
        for photo in dict.fromkeys(face for face, _ in self.settings.videos):
            image = read_image(photo)
            aligned = detect_and_align(detector, image)
            if aligned is None:
                raise TrainingError(f"--validation-faces: no face found in {photo}. Use a clear, front-facing "
                                    f"photo where the face is at least ~60 px tall.")
            crop = torch.from_numpy(aligned.crop.copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, 224, 224)
            self.faces.append(Face(photo, clip_penultimate(frozen.image_encoder, crop.to(device)).float(),
                                   References.of([image], self.models)))
        null = mean_colour(torch.empty(0)).expand(1, 3, CLIP_SIZE, CLIP_SIZE)  # normalises to 0: the null face
        self.null_features = clip_penultimate(frozen.image_encoder, null.to(device)).float()  # official §4.4
        self.vae = load_vae(checkpoint, device=device, dtype=dtype)
        self.pipeline = AnimateDiffPipeline(vae=self.vae, text_encoder=frozen.text_encoder,
                                            tokenizer=frozen.tokenizer, unet=frozen.unet, motion_adapter=None,
                                            scheduler=sampling_scheduler(frozen.scheduler))
        self.pipeline.set_progress_bar_config(disable=True)
        logger.info("Validation every %d steps: %d videos (%d faces, %d prompts), %d frames at %d px, %d steps.",
                    self.settings.every, len(self.settings.videos), len(self.faces), len(self.settings.prompts),
                    self.settings.frames, self.settings.size, self.settings.steps)

    def due(self, step: int) -> bool:
        return step % self.settings.every == 0 or step == self.max_steps

    def resume(self, step: int) -> None:
        """Rows after `step` came from a run that died before saving its state: dropped, so the
        resumed run appends its own (as train/loop.py does with loss.jsonl)."""
        if self.main and (self.out / LOG).is_file():
            rows = [row for row in read_log(self.out / LOG) if row["step"] <= step]
            write_atomic(self.out / LOG, "".join(json.dumps(row) + "\n" for row in rows))

    def run(self, adapter: torch.nn.Module, step: int) -> dict[str, Any] | None:
        """Validate the adapter at `step` (main process), every process waiting for it; the row."""
        row = None
        if self.main:
            started = time.monotonic()
            devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
            training = adapter.training
            adapter.eval()
            try:
                with torch.random.fork_rng(devices=devices), torch.no_grad():
                    videos = [self.render(adapter, k) for k in range(len(self.settings.videos))]
                    records = [self.score(k, frames) for k, frames in enumerate(videos)]
            finally:
                adapter.train(training)
            row = self.write(step, videos, records, time.monotonic() - started)
        self.accelerator.wait_for_everyone()
        return row

    # -- one video ----------------------------------------------------------------------------

    def face(self, photo: Path) -> Face:
        return next(face for face in self.faces if face.photo == photo)

    def render(self, adapter: torch.nn.Module, k: int) -> np.ndarray:
        """Video k as (F, H, W, 3) uint8 frames."""
        photo, prompt = self.settings.videos[k]
        face = self.face(photo)
        frozen, s = self.frozen, self.settings
        text, negative = encode_prompts(frozen.text_encoder, frozen.tokenizer, [prompt, s.negative_prompt]).chunk(2)
        # [text ‖ face tokens] and [negative ‖ null face tokens]: (1, 77 + Q, D); the pipeline puts
        # them in the [uncond; cond] order and repeats them per frame
        cond = adapter.encoder_hidden_states(text, adapter.face_tokens(face.features), 1)
        uncond = adapter.encoder_hidden_states(negative, adapter.face_tokens(self.null_features), 1)
        generator = torch.Generator("cpu").manual_seed(s.seed + k)  # the same noise on every device
        latents = self.pipeline(prompt_embeds=cond, negative_prompt_embeds=uncond, num_frames=s.frames,
                                height=s.size, width=s.size, num_inference_steps=s.steps,
                                guidance_scale=s.guidance, generator=generator, output_type="latent").frames
        return self.decode(latents)

    def decode(self, latents: Tensor) -> np.ndarray:
        """(1, C, F, h, w) latents -> (F, H, W, 3) uint8, frame by frame (official §7.4)."""
        scale = self.vae.config.scaling_factor
        param = next(self.vae.parameters())
        frames = []
        for f in range(latents.shape[2]):
            image = self.vae.decode(latents[:, :, f].to(param.device, param.dtype) / scale).sample  # (1, 3, H, W)
            image = (image.float() / 2 + 0.5).clamp(0, 1)
            frames.append((image[0].permute(1, 2, 0) * 255).round().to(torch.uint8).cpu().numpy())
        return np.stack(frames)

    def score(self, k: int, frames: np.ndarray) -> dict[str, Any]:
        from .score import score_video

        photo, prompt = self.settings.videos[k]
        _, summary = score_video(enumerate(frames), self.face(photo).references, self.models)
        return {"video": f"{k}-{photo.stem}", "face": str(photo), "prompt": prompt, "seed": self.settings.seed + k,
                "summary": summary}

    # -- outputs ------------------------------------------------------------------------------

    def write(self, step: int, videos: list[np.ndarray], records: list[dict[str, Any]],
              seconds: float) -> dict[str, Any]:
        from .score import mean_of_videos

        folder = self.out / FOLDER / f"step-{step}"
        for record, frames in zip(records, videos):
            write_gif(folder / f"{record['video']}.gif", frames)
        means = mean_of_videos(records)["summary"]
        row = {"step": step, **{key: means[key] for key in SCORES}, "seconds": round(seconds, 3),
               "videos": [{"video": f"{FOLDER}/step-{step}/{r['video']}.gif", "face": r["face"], "prompt": r["prompt"],
                           "seed": r["seed"], **r["summary"]} for r in records]}
        append_jsonl(self.out / LOG, [row])
        plot_validation(read_log(self.out / LOG), self.out / PLOT)
        self.accelerator.log({f"validation/{key}": row[key] for key in SCORES if row[key] is not None}, step=step)
        tracker = tensorboard_tracker(self.accelerator)
        if tracker is not None:
            tracker.log_images({f"validation/{r['video']}": frames for r, frames in zip(records, videos)},
                               step=step, dataformats="NHWC")
        logger.info("Validation at step %d (%.1f s): face similarity %s, CLIP-I %s, face share %s.", step, seconds,
                    *(row[key] for key in SCORES))
        return row


def tensorboard_tracker(accelerator: Any) -> Any | None:
    """accelerate's TensorBoard tracker when the run logs to TensorBoard (--report-to tensorboard)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            return tracker
    return None


def write_gif(path: Path, frames: np.ndarray, fps: int = GIF_FPS) -> None:
    """An animated GIF of (F, H, W, 3) uint8 frames, looping (Pillow only)."""
    from PIL import Image

    images = [Image.fromarray(frame) for frame in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                       loop=0)


def read_log(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path, what="validation log", fix="delete it (validation.png is drawn from it)")


def plot_validation(rows: list[dict[str, Any]], path: Path) -> None:
    """validation.png: face similarity, CLIP-I and face share against step (the score plot's
    drawing, one point per validation; validations without any face are marked)."""
    from PIL import Image

    from ..adapter.score_plot import Series, plot_scores

    steps = [row["step"] for row in rows]
    series = [Series(label, [row.get(key) for row in rows])
              for label, key in (("face similarity", "face_similarity"), ("CLIP-I", "clip_i"),
                                 ("face share", "face_share"))]
    last = rows[-1] if rows else {}
    title = (f"step {last.get('step', '-')}: face sim {_shown(last.get('face_similarity'))}, "
             f"CLIP-I {_shown(last.get('clip_i'))}, share {_shown(last.get('face_share'))}")  # clear of the legend
    no_face = [row["step"] for row in rows if not row.get("face_share")]
    pixels = plot_scores(series, title, no_face=no_face, frames=steps)
    with atomic_path(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def _shown(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"
