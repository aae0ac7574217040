"""Caption length against CLIP's 77 tokens (issue 20 item 2): the trainer's text encoder reads
75 caption tokens between its start and end tokens and drops the rest, silently. Every unified
caption is tokenized with the SD1.5 CLIP tokenizer the trainer uses (train/sd15.load_tokenizer);
a truncated caption is counted and listed with the words lost, and for a template merge, with the
part (attribute/action) that lost them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..adapter.errors import TrainingError

logger = logging.getLogger(__name__)

LIMIT = 77  # tokens, start and end tokens included (CLIP ViT-L/14 max_position_embeddings)


@dataclass(frozen=True)
class Length:
    """A caption's length: its tokens (start and end included) and what truncation keeps."""

    tokens: int
    kept_chars: int  # the caption's first kept_chars characters survive (whole words)
    lost: str | None  # the words dropped, None when it fits

    @property
    def truncated(self) -> bool:
        return self.lost is not None


def open_tokenizer(folder: Path | None):
    """The trainer's tokenizer (--tokenizer, else ComfyUI's comfy/sd1_tokenizer); None, with a
    warning, when neither is there."""
    from .sd15 import default_tokenizer_dir, load_tokenizer

    if folder is None and default_tokenizer_dir() is None:
        logger.warning("Caption lengths are not measured: no SD1.5 CLIP tokenizer was found. Pass --tokenizer DIR "
                       "(ComfyUI/comfy/sd1_tokenizer) to count captions cut at %d tokens.", LIMIT)
        return None
    return load_tokenizer(folder)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, truncation=False, verbose=False).input_ids)


def measure(caption: str, tokenizer) -> Length:
    """Tokens of `caption`; when over the limit, the longest run of whole words that fits."""
    tokens = _count(tokenizer, caption)
    if tokens <= LIMIT:
        return Length(tokens, len(caption), None)
    words = caption.split(" ")
    low, high = 0, len(words)  # invariant: words[:low] fits, words[:high] does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if _count(tokenizer, " ".join(words[:middle])) <= LIMIT else (low, middle)
    kept = len(" ".join(words[:low]))
    return Length(tokens, kept, caption[kept:].strip())


def cut_parts(caption: str, parts: dict[str, str | None], length: Length) -> dict[str, int]:
    """part name -> words of it lost, for the parts of a template merge that truncation cuts."""
    from .captions import tidy

    cut: dict[str, int] = {}
    if not length.truncated:
        return cut
    for name, text in parts.items():
        text = tidy(text or "").rstrip(" .!?")
        start = caption.find(text) if text else -1
        if start < 0:
            continue
        lost = caption[max(start, length.kept_chars):start + len(text)].split()
        if lost:
            cut[name] = len(lost)
    return cut


def annotate(rows: list[dict], tokenizer, template: str | None) -> list[dict]:
    """Adds tokens / truncated / lost to each row, and cut to the rows whose caption is `template`'s
    merge of their parts (not a unified caption given or written by an LLM); returns the truncated rows."""
    from .captions import merge_caption

    truncated = []
    for row in rows:
        length = measure(row["caption"], tokenizer)
        row.update(tokens=length.tokens, truncated=length.truncated, lost=length.lost)
        if template is not None:
            merged = merge_caption(row.get("attribute"), row.get("action"), template) == row["caption"]
            row["cut"] = (cut_parts(row["caption"], {"attribute": row.get("attribute"),
                                                     "action": row.get("action")}, length) or None) if merged else None
        if length.truncated:
            truncated.append(row)
    return truncated


def describe_cut(row: dict) -> str:
    """One line for the summary: the video, its length and what was lost."""
    cut = row.get("cut")
    parts = f" from the {' and the '.join(f'{name} ({words} words)' for name, words in cut.items())}" if cut else ""
    return f"{row['id']}: {row['tokens']} tokens > {LIMIT}; lost{parts}: {row['lost']!r}"


def report(rows: list[dict], truncated: list[dict], list_path: Path, shown: int = 20) -> str:
    """The summary lines, and the full list written to `list_path` (removed when none is cut)."""
    if not truncated:
        list_path.unlink(missing_ok=True)
        return f"caption length: all {len(rows)} captions fit CLIP's {LIMIT} tokens"
    lines = [describe_cut(row) for row in truncated]
    try:
        list_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as error:
        raise TrainingError(f"Cannot write {list_path}: {error}") from error
    head = [f"caption length: {len(truncated)} of {len(rows)} captions are cut at CLIP's {LIMIT} tokens "
            f"(listed in {list_path}):"]
    more = [f"... and {len(lines) - shown} more"] if len(lines) > shown else []
    return "\n".join(head + ["  " + line for line in lines[:shown]] + more)
