"""Captions (paper §3.3.1): attribute + action captions merged into one unified caption per video.

The paper replaced CelebV-HQ's template captions with a *human attribute caption* (an image
captioner on a frame: who the person is, what they look like) and a *human action caption* (a
video captioner on the clip: what they do), merged by an LLM into a *unified human caption*. Here
the two parts come from files the user made (with any captioner) and are merged by a template;
a unified caption written by the user (or an LLM) is taken as it is.

Where captions are read, per video (its manifest row, or when that gives no caption its sidecar files):
- a manifest, `--manifest FILE.csv` or `.jsonl`: one row per video with `id` (the video id, see
  `train/video.py`) or `video` (its path, relative to the manifest's folder), and `caption`
  and/or `attribute` and `action`;
- sidecar files next to the video `clip.mp4`: `clip.txt` (unified caption), `clip.attribute.txt`
  and `clip.action.txt` (the two parts).
A unified caption, when given, wins; otherwise the parts are merged with the template
(default `"{attribute}, {action}"`): each part is stripped of surrounding blanks and trailing
`, ; : .`, whitespace is collapsed, and after formatting no blank precedes a punctuation mark, a run
of marks becomes one (its first sentence end `. ! ?` if any, else its first mark: ", ." -> ".",
",," -> ","), and the caption neither starts with a mark nor ends with `, ; :`. With only one part present, the caption is that part in the template (the other empty).
An empty file or field counts as absent: the empty prompt is the trainer's null text, chosen by
`--null-text-rate`, never by the dataset.

Output: a JSONL file, one row per video: {"id", "caption", "attribute", "action"} (parts null when
absent). Videos without any caption are an error, unless `--allow-missing`: then they are listed
(stderr and `<out>.missing.txt`) and left out, and training skips them.

Caption length: with the SD1.5 CLIP tokenizer (`--tokenizer`, default ComfyUI's
comfy/sd1_tokenizer) every caption is tokenized; rows gain "tokens", "truncated", "lost" (the words
past CLIP's 77 tokens) and "cut" (for merged parts: words lost per part, e.g. {"action": 12}).
The cut captions are counted in the printed summary and listed in `<out>.truncated.txt`.

To make the parts with local models (the paper's ShareGPT4V, Video-LLaVA and an LLM), see the
`caption` command (train/caption.py).
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from ..adapter.errors import TrainingError
from . import caption_length
from ..adapter.files import read_jsonl, write_atomic
from .video import Video, find_videos

logger = logging.getLogger(__name__)

TEMPLATE = "{attribute}, {action}"
FIELDS = ("attribute", "action")
_MARKS = ",.;:!?"


@dataclass(frozen=True)
class CaptionSource:
    """What was found for one video: a unified caption and/or the two parts (None = absent)."""

    caption: str | None = None
    attribute: str | None = None
    action: str | None = None


# ----------------------------------------------------------------------------- merging

def _text(value: object) -> str | None:
    """A field's text with whitespace collapsed; None when absent or blank."""
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text or None


def _part(text: str | None) -> str:
    """A part as it enters the template: without trailing marks (the template adds its own)."""
    return (text or "").rstrip(" " + _MARKS.replace("!", "").replace("?", ""))


def check_template(template: str) -> str:
    """The template, if it names only {attribute} and {action}, at least one of them."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise TrainingError(f"Caption template {template!r} is not a format string: {error}.") from None
    unknown = names - set(FIELDS)
    if unknown or not names:
        raise TrainingError(f"Caption template {template!r} may use only {{attribute}} and {{action}} "
                            f"(and needs one of them); found {', '.join(sorted(unknown)) or 'neither'}.")
    return template


def _one_mark(run: re.Match) -> str:
    """A run of marks as one: its first sentence end (. ! ?) if any, else its first mark."""
    marks = [c for c in run.group(0) if c in _MARKS]
    return next((c for c in marks if c in ".!?"), marks[0])


def tidy(caption: str) -> str:
    """Whitespace and punctuation cleaned up after formatting (see the module docstring)."""
    caption = " ".join(caption.split())
    caption = re.sub(rf"\s+([{_MARKS}])", r"\1", caption)  # "smiles ," -> "smiles,"
    caption = re.sub(rf"[{_MARKS}](?:\s*[{_MARKS}])+", _one_mark, caption)  # ", ." -> "."
    caption = caption.lstrip(" " + _MARKS)
    return caption.rstrip(" ,;:")


def merge_caption(attribute: str | None, action: str | None, template: str = TEMPLATE) -> str | None:
    """The unified caption of an attribute and an action caption; None when both are absent."""
    attribute, action = _text(attribute), _text(action)
    if attribute is None and action is None:
        return None
    return tidy(check_template(template).format(attribute=_part(attribute), action=_part(action))) or None


def unified(source: CaptionSource, template: str = TEMPLATE) -> str | None:
    """The caption training uses: the given unified caption, else the merged parts."""
    return _text(source.caption) or merge_caption(source.attribute, source.action, template)


# ----------------------------------------------------------------------------- reading sources

def _read_text(path: Path) -> str | None:
    try:
        return _text(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"Cannot read the caption file {path}: {error}; save it as UTF-8 text.") from error


def sidecar_source(video_path: Path) -> CaptionSource:
    """`clip.txt`, `clip.attribute.txt` and `clip.action.txt` beside `clip.mp4` (absent ones: None)."""
    def read(suffix: str) -> str | None:
        path = video_path.with_name(video_path.stem + suffix)
        return _read_text(path) if path.is_file() else None

    return CaptionSource(read(".txt"), read(".attribute.txt"), read(".action.txt"))


def _manifest_rows(path: Path) -> list[tuple[int, dict]]:
    """(line or row number, row with lower-cased keys) of a CSV or JSONL manifest."""
    if not path.is_file():
        raise TrainingError(f"Caption manifest {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as error:
        raise TrainingError(f"Cannot read the caption manifest {path}: {error}; save it as UTF-8.") from error
    rows: list[tuple[int, dict]] = []
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        for row in reader:
            if None in row:
                raise TrainingError(f"{path}:{reader.line_num}: more fields than the header names; "
                                    f"quote captions that contain commas.")
            rows.append((reader.line_num, {k.strip().lower(): v for k, v in row.items() if k}))
    elif suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise TrainingError(f"{path}:{number}: not a JSON object ({error}).") from None
            if not isinstance(row, dict):
                raise TrainingError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}.")
            rows.append((number, {str(k).strip().lower(): v for k, v in row.items()}))
    else:
        raise TrainingError(f"Caption manifest {path} must be a .csv or .jsonl file.")
    return rows


def read_manifest(path: str | Path, videos: list[Video] = ()) -> dict[str, CaptionSource]:
    """video id -> its captions, from a CSV/JSONL manifest. Rows name the video by `id`, or by
    `video` (a path relative to the manifest's folder, matched against `videos`)."""
    path = Path(path)
    by_path = {video.path.resolve(): video.id for video in videos}
    sources: dict[str, CaptionSource] = {}
    for number, row in _manifest_rows(path):
        where = f"{path}:{number}"
        video_id = _text(row.get("id"))
        if video_id is None and _text(row.get("video")) is not None:
            video_path = (path.parent / str(row["video"]).strip()).resolve()
            video_id = by_path.get(video_path, Path(str(row["video"]).strip()).with_suffix("").as_posix())
        if video_id is None:
            raise TrainingError(f"{where}: no `id` or `video` column/key naming the video "
                                f"(found: {', '.join(row) or 'nothing'}).")
        if video_id in sources:
            raise TrainingError(f"{where}: a second row for video {video_id!r}; keep one.")
        if not any(key in row for key in ("caption", *FIELDS)):
            raise TrainingError(f"{where}: no `caption`, `attribute` or `action` column/key "
                                f"(found: {', '.join(row)}).")
        sources[video_id] = CaptionSource(_text(row.get("caption")), _text(row.get("attribute")),
                                          _text(row.get("action")))
    return sources


# ----------------------------------------------------------------------------- output

def caption_rows(videos: list[Video], manifest: dict[str, CaptionSource] | None = None,
                 template: str = TEMPLATE, sidecars: bool = True) -> tuple[list[dict], list[str]]:
    """(one output row per captioned video, ids of videos without any caption), in video order.
    A video's manifest row is used when it yields a caption, else its sidecar files."""
    check_template(template)
    rows, missing = [], []
    for video in videos:
        source = (manifest or {}).get(video.id, CaptionSource())
        caption = unified(source, template)
        if caption is None and sidecars:
            source = sidecar_source(video.path)
            caption = unified(source, template)
        if caption is None:
            missing.append(video.id)
            continue
        rows.append({"id": video.id, "caption": caption, "attribute": _text(source.attribute),
                     "action": _text(source.action)})
    return rows, missing


def write_captions(rows: list[dict], path: Path) -> None:
    """The JSONL file, atomically (a reader never sees half of it)."""
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def load_captions(path: str | Path) -> dict[str, str]:
    """video id -> unified caption, from the `captions` command's JSONL."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"Captions file {path} does not exist; make it with "
                            f"`python -m id_animator.train captions VIDEOS --out {path}`.")
    captions: dict[str, str] = {}
    for number, row in read_jsonl(path, what="captions file", numbered=True,
                                  fix="make it again with the `captions` command"):
        try:
            video_id, caption = row["id"], row["caption"]
        except (ValueError, KeyError, TypeError) as error:
            raise TrainingError(f"{path}:{number}: not a captions row ({{\"id\", \"caption\", ...}}): "
                                f"{error}.") from None
        if not isinstance(video_id, str) or not isinstance(caption, str):
            raise TrainingError(f"{path}:{number}: `id` and `caption` must be strings.")
        if video_id in captions:
            raise TrainingError(f"{path}:{number}: a second row for video {video_id!r}.")
        captions[video_id] = caption
    return captions


# ----------------------------------------------------------------------------- command line

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="VIDEOS",
                        help="video folders, files or .txt lists (captions are read from sidecar "
                             "files beside them); optional with --manifest, whose ids are then used")
    parser.add_argument("--out", type=Path, required=True, metavar="CAPTIONS.jsonl", help="the output JSONL")
    parser.add_argument("--manifest", type=Path,
                        help="CSV or JSONL with id (or video), caption and/or attribute, action")
    parser.add_argument("--template", default=TEMPLATE,
                        help=f"how attribute and action merge into the unified caption (default {TEMPLATE!r})")
    parser.add_argument("--allow-missing", action="store_true",
                        help="leave videos without any caption out (listed) instead of failing")
    parser.add_argument("--tokenizer", type=Path, help="SD1.5 CLIP tokenizer folder, to count captions cut at 77 "
                                                       "tokens (default: ComfyUI's comfy/sd1_tokenizer)")


def run(args: argparse.Namespace) -> int:
    check_template(args.template)
    if not args.inputs and args.manifest is None:
        raise TrainingError("Give the videos (sidecar captions beside them), a --manifest, or both.")
    videos = find_videos(args.inputs) if args.inputs else []
    manifest = read_manifest(args.manifest, videos) if args.manifest else None
    sidecars = bool(videos)
    if not videos:  # the manifest alone: its rows are the dataset
        videos = [Video(Path(video_id), video_id) for video_id in manifest]
    elif manifest:
        unknown = sorted(set(manifest) - {video.id for video in videos})
        if unknown:
            logger.info("%d manifest rows name no video given (e.g. %s); ignored", len(unknown), unknown[0])
    rows, missing = caption_rows(videos, manifest, args.template, sidecars)
    missing_list = args.out.with_name(args.out.stem + ".missing.txt")
    if missing:
        for video_id in missing[:20]:
            print(f"no caption: {video_id}", file=sys.stderr)
        if len(missing) > 20:
            print(f"... and {len(missing) - 20} more", file=sys.stderr)
        if not args.allow_missing:
            raise TrainingError(
                f"{len(missing)} of {len(videos)} videos have no caption (e.g. {missing[0]}): give "
                f"{Path(missing[0]).name}.txt (or .attribute.txt / .action.txt) beside the video or "
                f"a manifest row, or pass --allow-missing to train without them.")
        missing_list.write_text("".join(f"{video_id}\n" for video_id in missing))
    else:
        missing_list.unlink(missing_ok=True)
    if not rows:
        raise TrainingError(f"None of the {len(videos)} videos has a caption; nothing written.")
    tokenizer = caption_length.open_tokenizer(args.tokenizer)
    if tokenizer is not None:
        truncated = caption_length.annotate(rows, tokenizer, args.template)
    write_captions(rows, args.out)
    print(f"captions {args.out}: {len(rows)} videos"
          + (f", {len(missing)} without caption left out (listed in {missing_list})" if missing else ""))
    if tokenizer is not None:
        print(caption_length.report(rows, truncated, args.out.with_name(args.out.stem + ".truncated.txt")))
    return 0
