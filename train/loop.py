"""`train`: random reference training of the face adapter with accelerate (paper §3.3-§4.1).

Frozen: the SD1.5 UNet with the AnimateDiff motion module (diffusers `UNetMotionModel`), the CLIP
text encoder and the CLIP ViT-H/14 image encoder (the VAE is not needed: latents are cached).
Trained: the face adapter only (Resampler, face K/V, attn2 LoRA), AdamW, lr 1e-4.

One step (the paper's loss, `E||ε − ε_θ(z_t, t, C_text, C_face)||²`): one timestep per clip,
z_t = DDPM add_noise(z_0, ε, t) on AnimateDiff's schedule, the text context repeated once per
frame (B·F, 77, 768) (diffusers' UNetMotionModel does not repeat it), the reference's 16 face
tokens appended after the 77 text tokens of every frame, ε-MSE in fp32.

Laid out like a diffusers training example: `build_frozen_models`, `build_adapter`,
`build_training_set`, `training_step` (usable on pre-built modules, e.g. a tiny UNet in tests),
`train` (the loop), `configure`/`run` (the command). Runs as plain `python` on one device or under
`accelerate launch` (DDP on one or several machines, DeepSpeed ZeRO-2; see train/configs/).

RUN_DIR: `state/step-<n>/` (accelerate save_state, for --resume), `exports/step-<n>/animator.ckpt`
and `animator.safetensors`, `loss.jsonl` (step, loss, lr, time), `loss.png`, `logs/` (TensorBoard),
`args.json`; with `--validate-every`, `validation.jsonl`, `validation.png` and `validation/`
(train/validation.py: videos rendered and scored while training).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..adapter.clip_image import mean_colour
from ..adapter.errors import TrainingError
from ..adapter.files import append_jsonl, atomic_path, read_jsonl, write_atomic
from .data import StepBatches, TrainingSet, collate
from .lr_schedule import SCHEDULES, make_lr_scheduler
from .sd15 import clip_penultimate, encode_prompts
from .validation import Validator, configure as configure_validation, settings_of as validation_settings

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate mixed_precision


@dataclass
class FrozenModels:
    """Everything that does not train; eval mode, requires_grad False, in the compute dtype."""

    unet: torch.nn.Module  # diffusers UNetMotionModel: (B, C, F, H, W), one timestep per clip
    text_encoder: torch.nn.Module  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    image_encoder: torch.nn.Module  # transformers CLIPVisionModelWithProjection
    scheduler: Any  # diffusers DDPMScheduler (AnimateDiff's betas)


def freeze(module: torch.nn.Module, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> torch.nn.Module:
    """Out of training: no gradients, eval mode, cast (`.to` replaces tensors, never edits them).

    Cast before `FaceAdapter.install`: the adapter's processors stay outside the UNet's tree
    anyway (train/model.py), so neither this cast nor the freeze reaches them."""
    module = module.requires_grad_(False).eval().to(device)
    if dtype is not None and dtype != next(module.parameters()).dtype:
        module = module.to(dtype=dtype)
    return module


def reference_crops(reference: Tensor, drop_image: Tensor) -> Tensor:
    """uint8 crops (B, 3, 224, 224) -> floats in [0, 1]; a dropped face becomes CLIP's mean colour.

    Its CLIP-normalised pixels are exactly zero: the official null face (the uncond tokens of
    inference, official §4.4), not a black photo.
    """
    crops = reference.float() / 255
    return torch.where(drop_image.view(-1, 1, 1, 1).to(crops.device), mean_colour(crops), crops)


def training_step(adapter: torch.nn.Module, frozen: FrozenModels, batch: dict[str, Any],
                  device: torch.device | str) -> Tensor:
    """The ε-MSE loss of one batch from `data.collate` (fp32 scalar, with a graph to the adapter).

    `adapter` is the FaceAdapter installed on `frozen.unet`, or its DDP/DeepSpeed wrapper: the
    step goes through its forward so the wrapper sees it and all-reduces the gradients."""
    latents = rearrange(batch["latents"].to(device), "b f c h w -> b c f h w")
    noise = rearrange(batch["noise"].to(device), "b f c h w -> b c f h w")
    timesteps = batch["timestep"].to(device)  # (B,): one per clip, shared by its frames
    noisy_latents = frozen.scheduler.add_noise(latents, noise, timesteps)
    text = encode_prompts(frozen.text_encoder, frozen.tokenizer, batch["caption"])  # no_grad
    features = clip_penultimate(frozen.image_encoder,  # (B, 257, E), no_grad
                                reference_crops(batch["reference"].to(device), batch["drop_image"]))
    # fp32 inputs: autocast casts them down where the compute dtype asks for it.
    prediction = adapter(frozen.unet, noisy_latents, timesteps, text.float(), features.float())
    return F.mse_loss(prediction.float(), noise.float())


def make_optimizer(adapter: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 1e-2,
                   betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over exactly the adapter's trainable tensors (paper §4.1: lr 1e-4)."""
    return torch.optim.AdamW(adapter.trainable_parameters(), lr=lr, betas=betas,
                             weight_decay=weight_decay, eps=eps)


# --- Building the models and the data ---------------------------------------------------------------


def _from_folder(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise TrainingError(f"{folder} has no {what} folder (a diffusers model folder needs "
                            f"{what}/config.json and its weights).")
    return folder


def build_frozen_models(checkpoint: str | Path, motion_module: str | Path, image_encoder: str | Path, *,
                        tokenizer: str | Path | None = None, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> FrozenModels:
    """The frozen models, from the files ComfyUI users have (single-file SD1.5 checkpoint,
    AnimateDiff motion module, clip_vision ViT-H/14: train/sd15.py), or from diffusers /
    transformers model folders (an SD1.5 pipeline folder with unet/, text_encoder/ and tokenizer/,
    a MotionAdapter folder, a CLIPVisionModelWithProjection folder), read offline."""
    from . import sd15

    checkpoint, motion_module, image_encoder = Path(checkpoint), Path(motion_module), Path(image_encoder)
    if checkpoint.is_dir() or motion_module.is_dir():
        from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
        from transformers import CLIPTextModel

        if not (checkpoint.is_dir() and motion_module.is_dir()):
            raise TrainingError("Give --checkpoint and --motion-module both as files (SD1.5 single file, "
                                "AnimateDiff .ckpt) or both as diffusers folders.")
        unet2d = UNet2DConditionModel.from_pretrained(_from_folder(checkpoint / "unet", "unet"), local_files_only=True)
        motion = MotionAdapter.from_pretrained(motion_module, local_files_only=True)
        unet = freeze(UNetMotionModel.from_unet2d(unet2d, motion), device, dtype)
        del unet2d, motion
        text_encoder = CLIPTextModel.from_pretrained(_from_folder(checkpoint / "text_encoder", "text_encoder"),
                                                     local_files_only=True)
        if tokenizer is None and (checkpoint / "tokenizer" / "vocab.json").is_file():
            tokenizer = checkpoint / "tokenizer"
        tokens = sd15.load_tokenizer(tokenizer)
    else:
        # each model in the compute dtype as it loads: never all of them in fp32 at once
        unet = sd15.load_unet(checkpoint, motion_module, dtype=dtype, device=device)
        text_encoder, tokens = sd15.load_text_encoder(checkpoint, tokenizer, dtype=dtype, device=device)
    if image_encoder.is_dir():
        from transformers import CLIPVisionModelWithProjection

        vision = CLIPVisionModelWithProjection.from_pretrained(image_encoder, local_files_only=True)
    else:
        vision = sd15.load_image_encoder(image_encoder, dtype=dtype, device=device)
    return FrozenModels(unet=freeze(unet, device, dtype), text_encoder=freeze(text_encoder, device, dtype),
                        tokenizer=tokens, image_encoder=freeze(vision, device, dtype),
                        scheduler=sd15.noise_scheduler())


def read_adapter_config(path: str | Path | None) -> dict[str, Any]:
    """--adapter-config: {"rank": 128, "resampler": {"dim": 768, "depth": 4, ...}} overrides of the
    official adapter (other sizes do not load in LoadIDAnimator; for research and tests)."""
    if path is None:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise TrainingError(f"Cannot read the adapter config {path}: {error}.") from error
    if not isinstance(config, dict) or set(config) - {"rank", "resampler"}:
        raise TrainingError(f"{path}: an adapter config is a JSON object with 'rank' and/or 'resampler'.")
    return config


def build_adapter(unet: torch.nn.Module, image_encoder: torch.nn.Module, *, init: str = "scratch",
                  seed: int = 0, train_lora: bool = True, overrides: dict[str, Any] | None = None) -> torch.nn.Module:
    """The trainable FaceAdapter, its shapes read from the models (SD1.5: the official adapter)."""
    from .model import AdapterConfig, ResamplerConfig, initial_adapter

    overrides = overrides or {}
    resampler = ResamplerConfig(**{"embedding_dim": image_encoder.config.hidden_size,
                                   "output_dim": unet.config.cross_attention_dim,
                                   **overrides.get("resampler", {})})
    config = AdapterConfig.from_unet(unet, rank=overrides.get("rank", 128), resampler=resampler)
    # train_lora=False: K/V + Resampler only (the paper's text); the LoRAs keep their initial
    # values (zero up) and are still exported. From scratch, face K/V start as the UNet's text K/V.
    return initial_adapter(config, init, seed, unet=unet, train_lora=train_lora)


def build_training_set(latents: str | Path, pool: str | Path, captions: str | Path, *, seed: int,
                       null_text_rate: float, null_image_rate: float,
                       reference_exclude_window: int | None = None) -> TrainingSet:
    from .captions import load_captions
    from .face_pool import load_pool
    from .latents import LatentCache

    return TrainingSet(LatentCache(latents), load_pool(pool), load_captions(captions), seed=seed,
                       null_text_rate=null_text_rate, null_image_rate=null_image_rate,
                       reference_exclude_window=reference_exclude_window)


# --- Loss log --------------------------------------------------------------------------------------


def read_loss_log(path: Path) -> list[dict[str, Any]]:
    """The loss rows; the last one is dropped when a crash cut it short (then `truncate_loss_log`
    rewrites the file whole on resume)."""
    return read_jsonl(path, what="loss log", fix="delete it (only loss.png is drawn from it)")


def truncate_loss_log(path: Path, step: int) -> None:
    """Rows after `step` came from a run that died before saving its state: drop them."""
    rows = [row for row in read_loss_log(path) if row["step"] <= step]
    write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def plot_loss(rows: list[dict[str, Any]], path: Path, size: tuple[int, int] = (800, 480)) -> None:
    """loss.png: loss against step (PIL only: no plotting library needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 30, size[0] - 20, size[1] - 40
    draw.rectangle((left, top, right, bottom), outline="black")
    draw.text((left, 8), "training loss (eps-MSE)", fill="black")
    points = [(row["step"], row["loss"]) for row in rows if math.isfinite(row["loss"])]
    if points:
        steps, losses = zip(*points)
        x0, x1 = min(steps), max(steps) if max(steps) > min(steps) else min(steps) + 1
        y0, y1 = min(losses), max(losses) if max(losses) > min(losses) else min(losses) + 1e-6
        xy = [(left + (s - x0) / (x1 - x0) * (right - left), bottom - (v - y0) / (y1 - y0) * (bottom - top))
              for s, v in points]
        draw.line(xy, fill=(31, 119, 180), width=2) if len(xy) > 1 else draw.point(xy, fill=(31, 119, 180))
        draw.text((4, top), f"{y1:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{y0:.4g}", fill="black")
        draw.text((left, bottom + 6), f"step {x0}", fill="black")
        draw.text((right - 70, bottom + 6), f"step {max(steps)}", fill="black")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --- The loop --------------------------------------------------------------------------------------


class StepCounter:
    """Optimizer steps done and training seconds spent, saved with each state."""

    def __init__(self) -> None:
        self.step = 0
        self.seconds = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.seconds = int(state["step"]), float(state["seconds"])


def saved_states(out: Path) -> list[Path]:
    """RUN_DIR/state/step-<n> folders, oldest first."""
    folder = out / "state"
    found = [p for p in folder.glob("step-*") if p.is_dir() and p.name[5:].isdigit()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def resume_state(out: Path, resume: str | None) -> Path | None:
    """The state to resume from (None: a fresh run); refuses to overwrite a run silently."""
    states = saved_states(out)
    if resume is None:
        if states:
            raise TrainingError(f"{out} already holds training states (last {states[-1].name}); pass --resume "
                                f"to continue that run, or give another --out.")
        return None
    if resume != "latest":
        path = Path(resume)
        if not (path / "custom_checkpoint_0.pkl").is_file():
            raise TrainingError(f"{path} is not a training state of this trainer (RUN_DIR/state/step-<n>).")
        return path
    if not states:
        logger.warning("--resume: no state in %s/state yet; starting a new run.", out)
        return None
    return states[-1]


STREAM_FILE = "data_stream.json"  # in each state folder: what its data stream depends on


def data_stream(args: argparse.Namespace, world_size: int) -> dict[str, int]:
    """The settings that decide which clips each optimizer step reads (data.StepBatches)."""
    return {"world_size": world_size, "batch_size": args.batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps, "seed": args.seed}


def check_data_stream(state: Path, out: Path, stream: dict[str, int]) -> None:
    """Refuse a resume whose processes, batch, accumulation or seed differ from the saved run's:
    its steps would read other clips than the uninterrupted run (and the saved optimizer state
    belongs to another effective batch)."""
    path = state / STREAM_FILE
    if path.is_file():
        saved = json.loads(path.read_text())
    elif (out / "args.json").is_file():  # a state saved before STREAM_FILE existed
        saved = json.loads((out / "args.json").read_text())
    else:
        logger.warning("--resume: %s records no data-stream settings; not checked.", state)
        return
    flags = {"world_size": "processes (accelerate --num_processes)", "batch_size": "--batch-size",
             "gradient_accumulation_steps": "--gradient-accumulation-steps", "seed": "--seed"}
    changed = [f"{flags[key]} {saved[key]} -> {value}" for key, value in stream.items()
               if key in saved and saved[key] != value]
    if changed:
        raise TrainingError(f"--resume from {state}: {'; '.join(changed)}. A resumed run must keep the saved "
                            f"run's data stream; resume with the saved values, or start a new run "
                            f"(another --out, --init from an export of this one).")


def train(args: argparse.Namespace) -> int:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tqdm.auto import tqdm

    out = Path(args.out)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")))
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume = resume_state(out, args.resume)
    validation = validation_settings(args)  # its files checked before any model loads
    stream = data_stream(args, accelerator.num_processes)
    if resume is not None:
        check_data_stream(resume, out, stream)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "args.json", json.dumps({**{k: v for k, v in vars(args).items() if k != "run"},
                                                    "world_size": accelerator.num_processes},
                                                   indent=1, default=str))
    dtype = DTYPES[accelerator.mixed_precision]
    frozen = build_frozen_models(args.checkpoint, args.motion_module, args.image_encoder, tokenizer=args.tokenizer,
                                 device=accelerator.device, dtype=dtype)
    if args.gradient_checkpointing:
        frozen.unet.enable_gradient_checkpointing()
    adapter = build_adapter(frozen.unet, frozen.image_encoder, init=args.init, seed=args.seed,
                            train_lora=args.train_lora, overrides=read_adapter_config(args.adapter_config))
    adapter.to(accelerator.device, torch.float32)  # fp32 master weights; autocast computes in `dtype`
    adapter.install(frozen.unet)
    dataset = build_training_set(args.latents, args.pool, args.captions, seed=args.seed,
                                 null_text_rate=args.null_text_rate, null_image_rate=args.null_image_rate,
                                 reference_exclude_window=args.reference_exclude_window)
    optimizer = make_optimizer(adapter, lr=args.lr, weight_decay=args.weight_decay)
    accum = args.gradient_accumulation_steps
    batches = StepBatches(len(dataset), args.batch_size, seed=args.seed, rank=accelerator.process_index,
                          world_size=accelerator.num_processes)
    max_steps = args.max_steps or math.ceil(args.num_epochs * batches.per_epoch / accum)
    lr_scheduler = make_lr_scheduler(optimizer, args.lr_scheduler, warmup_steps=args.lr_warmup_steps,
                                     training_steps=max_steps, step_rules=args.lr_step_rules)
    if accelerator.state.deepspeed_plugin is not None:  # no dataloader is prepared to tell it
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = args.batch_size
    model, optimizer = accelerator.prepare(adapter, optimizer)
    progress = StepCounter()
    accelerator.register_for_checkpointing(progress, lr_scheduler)
    if resume is not None:
        accelerator.load_state(str(resume))
        logger.info("Resumed from %s at step %d.", resume, progress.step)
    batches.start = progress.step * accum  # a resumed run draws on from where the state was saved
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=args.dataloader_workers,
                                         pin_memory=accelerator.device.type == "cuda")
    loss_log = out / "loss.jsonl"
    if accelerator.is_main_process:
        truncate_loss_log(loss_log, progress.step)
    validator = None
    if validation is not None:
        validator = Validator(validation, accelerator, frozen, args.checkpoint, out, dtype, max_steps)
        validator.resume(progress.step)
    accelerator.init_trackers("id_animator", config={k: v for k, v in vars(args).items()
                                                     if isinstance(v, (int, float, str, bool))})
    logger.info("Training %d adapter tensors (%.1f M parameters) on %d clips, %d processes × batch %d × "
                "accumulation %d, to step %d.", len(adapter.trainable_parameters()),
                sum(p.numel() for p in adapter.trainable_parameters()) / 1e6, len(dataset),
                accelerator.num_processes, args.batch_size, accum, max_steps)
    bar = tqdm(total=max_steps, initial=progress.step, desc="train", unit="step",
               disable=not accelerator.is_local_main_process)
    window: list[float] = []
    frozen_at_start = fingerprint(frozen_tensors(frozen))
    batch_iter = iter(loader)
    if validator is not None and validation.at_start and progress.step == 0:
        validator.run(accelerator.unwrap_model(model), 0)
    started = time.monotonic() - progress.seconds
    while progress.step < max_steps:
        losses = []
        for _ in range(accum):
            batch = next(batch_iter)
            with accelerator.accumulate(model):
                loss = training_step(model, frozen, batch, accelerator.device)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        lr_scheduler.step()
        progress.step += 1
        progress.seconds = time.monotonic() - started
        step_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
        window.append(step_loss)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        last = progress.step == max_steps
        if progress.step % args.log_every == 0 or last:
            row = {"step": progress.step, "loss": sum(window) / len(window), "lr": lr_scheduler.get_last_lr()[0],
                   "time": round(progress.seconds, 3), "epoch": batches.position(progress.step * accum - 1)[0]}
            window = []
            accelerator.log({"loss": row["loss"], "lr": row["lr"]}, step=progress.step)
            if accelerator.is_main_process:
                append_jsonl(loss_log, [row])
        if validator is not None and validator.due(progress.step):  # before the state: a resume redoes it
            validator.run(accelerator.unwrap_model(model), progress.step)
        if (args.save_every and progress.step % args.save_every == 0) or last:
            save_state(accelerator, out, progress.step, args.keep_states, stream)
        if (args.export_every and progress.step % args.export_every == 0) or last:
            export(accelerator, model, out, progress.step)
    bar.close()
    check_replicas(accelerator, accelerator.unwrap_model(model), frozen, out, frozen_at_start)
    if accelerator.is_main_process:
        plot_loss(read_loss_log(loss_log), out / "loss.png")
    accelerator.end_training()
    return 0


def fingerprint(tensors: dict[str, Tensor]) -> str:
    """sha256 of names and exact bytes: equal only for bit-identical weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def frozen_tensors(frozen: FrozenModels) -> dict[str, Tensor]:
    return {f"{name}.{key}": value for name in ("unet", "text_encoder", "image_encoder")
            for key, value in getattr(frozen, name).state_dict().items()}


def check_replicas(accelerator: Any, adapter: torch.nn.Module, frozen: FrozenModels, out: Path,
                   expected_frozen: str | None = None) -> None:
    """Every process must end with the same adapter (DDP keeps replicas equal; a desync would
    train several models): fingerprints per process in RUN_DIR/replicas.json, checked here."""
    from accelerate.utils import gather_object

    mine = {"process": accelerator.process_index, "adapter": fingerprint(adapter.state_dict()),
            "frozen": fingerprint(frozen_tensors(frozen))}
    everyone = gather_object([mine])
    if accelerator.is_main_process:
        write_atomic(out / "replicas.json", json.dumps(everyone, indent=1))
    compare_replicas(everyone, out, expected_frozen)


def compare_replicas(entries: list[dict[str, Any]], out: Path, expected_frozen: str | None = None) -> None:
    """Refuse replicas that differ: adapters between processes, frozen weights between processes
    or against `expected_frozen` (their fingerprint when training started)."""
    if len({entry["adapter"] for entry in entries}) > 1:
        raise TrainingError(f"The adapter differs between processes at the end of training ({out}/replicas.json): "
                            f"the gradient all-reduce did not run; check the accelerate config.")
    frozen = {entry["frozen"] for entry in entries}
    if len(frozen) > 1:
        raise TrainingError(f"The frozen models differ between processes at the end of training "
                            f"({out}/replicas.json): the processes loaded different files or one of them "
                            f"changed its copy; give every process the same --checkpoint, --motion-module "
                            f"and --image-encoder files.")
    if expected_frozen is not None and frozen != {expected_frozen}:
        raise TrainingError(f"The frozen models changed during training ({out}/replicas.json): something "
                            f"trained or cast weights that must stay frozen; this run's exports are suspect.")


def save_state(accelerator: Any, out: Path, step: int, keep: int, stream: dict[str, int]) -> None:
    """accelerate save_state (adapter, optimizer, lr schedule, progress, RNG) to state/step-<n>,
    with the settings its data stream depends on (STREAM_FILE, checked by --resume)."""
    folder = out / "state" / f"step-{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STREAM_FILE).write_text(json.dumps(stream, indent=1) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for old in saved_states(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        plot_loss(read_loss_log(out / "loss.jsonl"), out / "loss.png")


def fp32_masters(accelerator: Any, adapter: torch.nn.Module) -> dict[str, Tensor] | None:
    """Under DeepSpeed, the adapter's fp32 master weights by parameter name (None otherwise).

    DeepSpeed runs the module in the compute dtype (bf16/fp16) and keeps the fp32 masters in the
    optimizer's partitions (ZeRO-2 shards them across processes), so the module's own tensors are
    rounded copies. `safe_get_full_fp32_param` gathers a parameter's master from every partition:
    a collective, so every process calls it, for every parameter, in the same order. A parameter
    the optimizer does not hold (frozen, e.g. the LoRA under --no-train-lora) has no master and
    keeps the module's value."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    from deepspeed.utils import safe_get_full_fp32_param

    masters = {}
    for name, parameter in adapter.named_parameters():
        master = safe_get_full_fp32_param(parameter) if parameter.requires_grad else None
        masters[name] = (parameter if master is None else master).detach().to("cpu", torch.float32)
    return masters


def export(accelerator: Any, model: torch.nn.Module, out: Path, step: int) -> None:
    """exports/step-<n>/animator.ckpt and animator.safetensors, verified by train/export.py; the
    fp32 master weights under DeepSpeed (`fp32_masters`), the module's fp32 tensors otherwise."""
    from .export import export_adapter

    adapter = accelerator.unwrap_model(model)
    masters = fp32_masters(accelerator, adapter)  # every process: a collective under DeepSpeed
    if accelerator.is_main_process:
        if masters is None:
            export_adapter(adapter, out / "exports" / f"step-{step}")
        else:
            export_adapter(adapter_with(adapter, masters), out / "exports" / f"step-{step}")
    accelerator.wait_for_everyone()


def adapter_with(adapter: torch.nn.Module, tensors: dict[str, Tensor]) -> Any:
    """The adapter's AdapterWeights with `tensors` (by parameter name) in place of its parameters,
    leaving the module untouched: swap the tensors in, read the weights, swap them back."""
    parameters = dict(adapter.named_parameters())
    if set(parameters) != set(tensors):
        raise TrainingError(f"The gathered weights name {len(tensors)} tensors, the adapter has {len(parameters)}.")
    kept = {name: parameter.data for name, parameter in parameters.items()}
    try:
        for name, parameter in parameters.items():
            parameter.data = tensors[name]
        return adapter.to_weights()  # detached copies: nothing refers to the swapped tensors after
    finally:
        for name, parameter in parameters.items():
            parameter.data = kept[name]


# --- The command -----------------------------------------------------------------------------------


def configure(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Run as `accelerate launch -m id_animator.train train ...` for several GPUs or machines "
                     "(train/configs/*.yaml), or as plain `python -m id_animator.train train ...` on one device.")
    models = parser.add_argument_group("frozen models")
    models.add_argument("--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors/.ckpt), "
                        "or a diffusers SD1.5 folder (unet/, text_encoder/, tokenizer/)")
    models.add_argument("--motion-module", required=True,
                        help="AnimateDiff motion module (mm_sd_v15_v2.ckpt), or a diffusers MotionAdapter folder")
    models.add_argument("--image-encoder", required=True, help="CLIP ViT-H/14 image encoder: ComfyUI's clip_vision "
                        "file (CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors), or a transformers folder")
    models.add_argument("--tokenizer", help="SD1.5 CLIP tokenizer folder (default: ComfyUI's comfy/sd1_tokenizer "
                        "when this pack sits in ComfyUI/custom_nodes)")
    data = parser.add_argument_group("data")
    data.add_argument("--latents", required=True, help="latent cache folder (the latents command)")
    data.add_argument("--pool", required=True, help="face pool folder (the pool command)")
    data.add_argument("--captions", required=True, help="captions JSONL (the captions command)")
    data.add_argument("--null-text-rate", type=float, default=0.2,
                      help="probability of the null text (empty prompt) per sample, for CFG (paper: 0.2)")
    data.add_argument("--null-image-rate", type=float, default=0.0,
                      help="probability of the null face (zero normalised image) per sample (paper: 0)")
    data.add_argument("--reference-exclude-window", type=int, metavar="MARGIN",
                      help="draw the reference only among pool faces outside the clip's span (first to last "
                      "sampled frame) widened by MARGIN frames each side (default: off, the paper's draw from "
                      "the whole pool, which may pick a face from inside the clip)")
    data.add_argument("--dataloader-workers", type=int, default=2, help="data loading processes per GPU")
    adapter = parser.add_argument_group("adapter")
    adapter.add_argument("--init", required=True, help="where the adapter starts (required): an IP-Adapter-Plus "
                         "SD1.5 file - the paper starts from IP-Adapter, i.e. ip-adapter-plus-face_sd15 - or an "
                         "animator.ckpt to fine-tune, or the word 'scratch' (random Resampler; a Resampler "
                         "trained from scratch learns little identity)")
    adapter.add_argument("--train-lora", action=argparse.BooleanOptionalAction, default=True,
                         help="train the attn2 LoRAs; --no-train-lora: face K/V + Resampler only (the "
                         "paper's text), the file still holds the (zero) LoRAs")
    adapter.add_argument("--adapter-config", help="JSON overrides of the official adapter shape: "
                         "{\"rank\": 128, \"resampler\": {\"dim\": 768, \"depth\": 4, ...}} (research, tests)")
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (paper: 1e-4)")
    optim.add_argument("--weight-decay", type=float, default=1e-2, help="AdamW weight decay")
    optim.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: off)")
    optim.add_argument("--lr-scheduler", default="constant", choices=SCHEDULES,
                       help="diffusers learning-rate schedule over the run's optimizer steps (default constant; "
                       "constant with a warmup is constant_with_warmup)")
    optim.add_argument("--lr-warmup-steps", type=int, default=0,
                       help="optimizer steps of linear warmup from 0 (default 0)")
    optim.add_argument("--lr-step-rules", help="piecewise_constant only: 'multiplier:until-step,...,final "
                       "multiplier', e.g. '1:1000,0.1:2000,0.01'")
    optim.add_argument("--batch-size", type=int, default=2, help="clips per GPU per micro-step (paper: 2)")
    optim.add_argument("--gradient-accumulation-steps", type=int, default=1)
    optim.add_argument("--max-steps", "--max-train-steps", dest="max_steps", type=int,
                       help="optimizer steps to train (default 100000, unless --num-epochs)")
    optim.add_argument("--num-epochs", type=float, help="train this many passes over the clips instead")
    optim.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="bf16",
                       help="compute dtype of the frozen models (adapter kept fp32); overrides accelerate config")
    optim.add_argument("--gradient-checkpointing", action="store_true", help="recompute UNet activations "
                       "in the backward pass (less memory, ~25%% more compute)")
    optim.add_argument("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    optim.add_argument("--seed", type=int, default=0, help="seeds the adapter init and every data draw")
    run_group = parser.add_argument_group("run folder")
    run_group.add_argument("--out", required=True, help="RUN_DIR: states, exports, loss log, TensorBoard logs")
    run_group.add_argument("--resume", nargs="?", const="latest", help="continue from RUN_DIR's last state "
                           "(or the state folder given)")
    run_group.add_argument("--save-every", type=int, default=1000, help="save a state every N steps")
    run_group.add_argument("--keep-states", type=int, default=3, help="states kept (0: all)")
    run_group.add_argument("--export-every", type=int, default=5000,
                           help="export animator.ckpt every N steps (0: only at the end)")
    run_group.add_argument("--log-every", type=int, default=10, help="loss log row every N steps")
    run_group.add_argument("--report-to", choices=("tensorboard", "none"), default="tensorboard")
    configure_validation(parser)


def run(args: argparse.Namespace) -> int:
    positive = {"batch_size": args.batch_size, "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "log_every": args.log_every}
    for name, value in positive.items():
        if value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} is {value}; give a positive number.")
    if args.max_steps is not None and args.num_epochs is not None:
        raise TrainingError("Give --max-steps or --num-epochs, not both.")
    if args.max_steps is None and args.num_epochs is None:
        args.max_steps = 100_000
    return train(args)
