"""`caption`: the paper's decoupled captions (§3.3.1) made with local models or a served one.

Per video: an *attribute caption* from an image VLM on one frame (ShareGPT4V in the paper: a
LLaVA-1.5 model), an *action caption* from a video VLM on frames spread over the whole video
(Video-LLaVA in the paper; a Qwen2-VL/2.5-VL model does both), and one *unified caption* merged
from the two by an instruct LLM (GPT-3.5 in the paper) with MERGE_PROMPT, which asks for a caption
that fits CLIP's 77 tokens. Without a merge model the two parts are merged by the `captions`
template. Models are given by path (see train/caption_models.py) or served by an
OpenAI-compatible endpoint; nothing is downloaded.

Which frames: the attribute frame is at `--attribute-at` of the video (0.5: the middle frame);
the action frames are `--action-frames` frames evenly spaced from the first to the last frame
(8: what Video-LLaVA was trained on). Both are recorded in each row.

Output: OUT (JSONL), one row per video, appended batch by batch: {"id", "caption", "attribute",
"action", "frames": {"attribute", "action"}, "tokens", "truncated", "lost"}; OUT.settings.json
holds the models, prompts and frame settings. A re-run resumes (the videos already in OUT are
skipped) and refuses other settings. `--shard i/n` (i from 0) captions every n-th video from the
i-th, in id order: give each shard its own OUT and concatenate them. `captions --manifest OUT`
(or training's `--captions OUT`) reads the result.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..adapter.errors import TrainingError
from . import caption_length
from .caption_models import Describer, open_model
from .captions import TEMPLATE, check_template, merge_caption
from .video import Video, find_videos, frame_count, read_frames

logger = logging.getLogger(__name__)

ATTRIBUTE_PROMPT = ("Describe the person in this image in one sentence: gender, age, hair, face, "
                    "clothing and accessories. Do not describe the background.")
ACTION_PROMPT = ("Describe in one sentence what the person in this video does: their actions, "
                 "expressions and head movements. Do not describe their appearance.")
MERGE_PROMPT = ("Merge the two descriptions of one person in a video into a single caption of at most "
                "40 words, so that it fits the 77-token limit of a CLIP text encoder. Keep who the person "
                "is and what they look like, and what they do. Answer with the caption only.\n"
                "Appearance: {attribute}\nAction: {action}")
FORMAT = 1


@dataclass(frozen=True)
class Settings:
    """What decides the captions (stored in OUT.settings.json; a resume must match it)."""

    attribute_model: str
    action_model: str
    merge_model: str | None
    attribute_prompt: str
    action_prompt: str
    merge_prompt: str | None
    template: str | None
    attribute_at: float
    action_frames: int
    shard: str
    format: int = FORMAT


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise TrainingError(f"--shard {text!r}: write it as i/n, e.g. 0/4 (i from 0 to n-1).") from None
    if count < 1 or not 0 <= index < count:
        raise TrainingError(f"--shard {text!r}: i must be from 0 to n-1 and n at least 1.")
    return index, count


def frame_plan(frames: int, attribute_at: float, action_frames: int) -> tuple[int, list[int]]:
    """(the attribute frame, the action frames) of a video of `frames` frames."""
    attribute = min(frames - 1, int(attribute_at * (frames - 1) + 0.5))
    action = np.linspace(0, frames - 1, min(action_frames, frames)).round().astype(int).tolist()
    if len(action) < action_frames:  # short video: repeat frames so video models get their count
        action = np.linspace(0, frames - 1, action_frames).round().astype(int).tolist()
    return attribute, action


def read_plan(video: Video, attribute_at: float, action_frames: int) -> tuple[dict, np.ndarray, list[np.ndarray]]:
    count = frame_count(video.path)
    if count == 0:
        raise TrainingError(f"{video.path} has no frames; remove it from the dataset.")
    attribute, action = frame_plan(count, attribute_at, action_frames)
    frames = dict(read_frames(video.path, sorted({attribute, *action})))
    return {"attribute": attribute, "action": action}, frames[attribute], [frames[i] for i in action]


def merge_prompt_text(template: str, attribute: str | None, action: str | None) -> str:
    return template.format(attribute=attribute or "(none)", action=action or "(none)")


def caption_batch(videos: list[Video], settings: Settings, attribute_model: Describer, action_model: Describer,
                  merge_model: Describer | None) -> list[dict]:
    """Rows for one batch of videos: the attribute, action and unified captions."""
    plans, stills, clips = [], [], []
    for video in videos:
        plan, still, clip = read_plan(video, settings.attribute_at, settings.action_frames)
        plans.append(plan), stills.append([still]), clips.append(clip)
    attributes = attribute_model.describe(stills, settings.attribute_prompt)
    actions = action_model.describe(clips, settings.action_prompt)
    attributes = [text or None for text in attributes]
    actions = [text or None for text in actions]
    if merge_model is not None:
        merged = merge_model.complete([merge_prompt_text(settings.merge_prompt, a, b)
                                       for a, b in zip(attributes, actions)])
    else:
        merged = [merge_caption(a, b, settings.template) for a, b in zip(attributes, actions)]
    return [{"id": video.id, "caption": caption or None, "attribute": attribute, "action": action, "frames": plan}
            for video, plan, attribute, action, caption in zip(videos, plans, attributes, actions, merged)]


# ----------------------------------------------------------------------------- output and resume

def read_rows(path: Path) -> list[dict]:
    """The rows already written; a torn last line (an interrupted run) is dropped."""
    if not path.is_file():
        return []
    rows, lines = [], path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                logger.warning("%s: its last line is incomplete (an interrupted run); captioning it again", path)
                break
            raise TrainingError(f"{path}:{number}: not a JSON row; delete the file to caption again.") from None
    return rows


def _rewrite(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        file.flush()
        os.fsync(file.fileno())


def check_settings(path: Path, settings: Settings, overwrite: bool) -> None:
    """Writes OUT.settings.json, or checks that a resumed run keeps its settings."""
    wanted = asdict(settings)
    if path.is_file() and not overwrite:
        stored = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
        if changed:
            raise TrainingError(f"{path} was written with other settings ({', '.join(changed)}: "
                                f"{[stored.get(k) for k in changed]} then, {[wanted.get(k) for k in changed]} now); "
                                f"give another --out, restore the settings, or pass --overwrite to caption again.")
        return
    path.write_text(json.dumps(wanted, indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- command line

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="VIDEOS", help="video folders, files or .txt lists")
    parser.add_argument("--out", type=Path, required=True, metavar="CAPTIONS.jsonl", help="the output JSONL")
    for role, example in (("attribute", "an image VLM: LLaVA-1.5 / ShareGPT4V, Video-LLaVA or Qwen2(.5)-VL"),
                          ("action", "a video VLM: Video-LLaVA or Qwen2(.5)-VL; default: the attribute model"),
                          ("merge", "an instruct LLM (any causal LM) or a VLM; default: merge by --template")):
        parser.add_argument(f"--{role}-model", required=role == "attribute",
                            help=f"{example}: a local model folder, or with --{role}-endpoint the served model name")
        parser.add_argument(f"--{role}-endpoint", metavar="URL",
                            help="an OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1, vLLM)")
    parser.add_argument("--attribute-prompt", default=ATTRIBUTE_PROMPT, help="the image VLM's prompt")
    parser.add_argument("--action-prompt", default=ACTION_PROMPT, help="the video VLM's prompt")
    parser.add_argument("--merge-prompt", default=MERGE_PROMPT, help="the LLM's prompt, with {attribute} and {action}")
    parser.add_argument("--template", default=TEMPLATE, help=f"merge without an LLM (default {TEMPLATE!r})")
    parser.add_argument("--attribute-at", type=float, default=0.5,
                        help="where the attribute frame is, 0 = first frame, 1 = last (default 0.5: the middle)")
    parser.add_argument("--action-frames", type=int, default=8, help="frames for the video VLM (default 8)")
    parser.add_argument("--batch-size", type=int, default=4, help="videos per model call (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=77, help="longest answer, in the model's tokens")
    parser.add_argument("--shard", default="0/1", help="i/n: caption every n-th video from the i-th (default 0/1)")
    parser.add_argument("--tokenizer", type=Path, help="SD1.5 CLIP tokenizer folder, to measure caption length "
                                                       "(default: ComfyUI's comfy/sd1_tokenizer)")
    parser.add_argument("--device", default="auto", help="torch device for local models (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="local model precision (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--overwrite", action="store_true", help="caption every video again")


def run(args: argparse.Namespace) -> int:
    import torch

    if args.batch_size < 1 or args.action_frames < 1 or not 0 <= args.attribute_at <= 1:
        raise TrainingError("--batch-size and --action-frames must be at least 1, --attribute-at from 0 to 1.")
    shard, shards = parse_shard(args.shard)
    merge_by_llm = bool(args.merge_model)
    if merge_by_llm and ("{attribute}" not in args.merge_prompt or "{action}" not in args.merge_prompt):
        raise TrainingError("--merge-prompt must contain {attribute} and {action}.")
    settings = Settings(
        attribute_model=args.attribute_model, action_model=args.action_model or args.attribute_model,
        merge_model=args.merge_model, attribute_prompt=args.attribute_prompt, action_prompt=args.action_prompt,
        merge_prompt=args.merge_prompt if merge_by_llm else None,
        template=None if merge_by_llm else check_template(args.template),
        attribute_at=args.attribute_at, action_frames=args.action_frames, shard=f"{shard}/{shards}")
    videos = sorted(find_videos(args.inputs), key=lambda video: video.id)[shard::shards]
    tokenizer = caption_length.open_tokenizer(args.tokenizer)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    check_settings(args.out.with_name(args.out.name + ".settings.json"), settings, args.overwrite)
    done = [] if args.overwrite else [row for row in read_rows(args.out) if row.get("id") in
                                      {video.id for video in videos}]
    _rewrite(args.out, done)  # drops a torn line before appending
    todo = [video for video in videos if video.id not in {row["id"] for row in done}]
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    options = dict(device=device, dtype=dtype, max_new_tokens=args.max_new_tokens)
    if todo:
        attribute_model = open_model(args.attribute_model, args.attribute_endpoint, **options)
        if (settings.action_model, args.action_endpoint or args.attribute_endpoint) == \
                (args.attribute_model, args.attribute_endpoint):
            action_model = attribute_model  # one model for both (e.g. Qwen2-VL): loaded once
        else:
            action_model = open_model(settings.action_model, args.action_endpoint, **options)
        if not action_model.can_see_video:
            raise TrainingError(f"{settings.action_model} reads images only; give --action-model a video VLM "
                                f"(Video-LLaVA or Qwen2-VL/2.5-VL).")
        merge_model = open_model(args.merge_model, args.merge_endpoint, **options) if merge_by_llm else None
        for start in range(0, len(todo), args.batch_size):
            rows = caption_batch(todo[start:start + args.batch_size], settings, attribute_model, action_model,
                                 merge_model)
            _append(args.out, rows)
            done += rows
            logger.info("captioned %d/%d videos", len(done), len(videos))
    captioned = [row for row in done if row["caption"]]
    if tokenizer is not None:
        caption_length.annotate(captioned, tokenizer, settings.template)
        _rewrite(args.out, done)
    empty = len(done) - len(captioned)
    print(f"caption {args.out}: {len(done)} videos ({len(done) - len(todo)} resumed)"
          + (f", {empty} with an empty caption (null)" if empty else ""))
    if tokenizer is not None:
        truncated = [row for row in captioned if row["truncated"]]
        print(caption_length.report(captioned, truncated, args.out.with_name(args.out.stem + ".truncated.txt")))
    return 0
