"""Small file plumbing shared by the pack and the trainer (standard library only).

- `write_atomic(path, text_or_bytes)`: a reader (or a re-run after a crash) sees the old file or
  the whole new one, never a part: written under a temporary name in the same folder, fsynced,
  renamed over the target, the folder fsynced so the rename survives a power cut.
- `atomic_path(path)`: the same for writers that want a path (safetensors `save_file`,
  `torch.save`, PIL `Image.save`): `with atomic_path(p) as tmp: save_file(..., tmp)`.
- `read_jsonl(path, what=..., fix=...)`: the rows of a JSONL file that is appended to; a last line
  cut short by a crash mid-append is dropped (with a warning), a bad line anywhere else is an
  error that says which file, which line and what to do.
- `refuse_other_settings(path, settings, what=..., fix=...)`: a folder that is filled in several
  runs (face pool, latent cache) records its settings on the first run; a later run with other
  settings is refused with the differences listed, instead of silently mixing the two.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import IDAnimatorError, TrainingError

logger = logging.getLogger(__name__)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: folders cannot be opened; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush a written file's data to the disk (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix, so format checks read right); on a clean exit
    it is fsynced and renamed to `path`, on an exception it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{path.suffix}.tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8") -> None:
    """Write `data` to `path` atomically and durably (see the module docstring)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding=encoding)
        else:
            tmp.write_bytes(data)


def append_jsonl(path: str | Path, rows: list[Mapping[str, Any]]) -> None:
    """Append rows to a JSONL file and fsync: a crash loses at most the line being written, which
    `read_jsonl` then drops."""
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path, *, what: str = "JSONL file", fix: str = "delete the file and run again",
               error: type[IDAnimatorError] = TrainingError, numbered: bool = False,
               torn_last_line: bool = True) -> list[Any]:
    """The rows of `path` ([] when it does not exist); a torn last line is dropped (unless
    `torn_last_line` is False: a file a person wrote), any other bad line raises `error` naming
    the file and line, `what` it is and the `fix`. `numbered`: (line number, row) pairs, for
    callers that check each row and name its line."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"Cannot read the {what} {path}: {e}; {fix}.") from e
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if torn_last_line and number == len(lines):
                logger.warning("%s: the last line is cut short (a run stopped while writing it); ignored.", path)
                break
            raise error(f"{path}:{number}: the {what} is damaged ({e}); {fix}.") from None
        rows.append((number, row) if numbered else row)
    return rows


def refuse_other_settings(path: str | Path, settings: Mapping[str, Any], *, what: str, fix: str,
                          keys: list[str] | None = None,
                          error: type[IDAnimatorError] = TrainingError) -> None:
    """Record `settings` in `path` (JSON) on the first run; on a later run, raise `error` when the
    recorded ones differ (only `keys` are compared when given), listing each difference."""
    path = Path(path)
    if not path.is_file():
        write_atomic(path, json.dumps(dict(settings), indent=2) + "\n")
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise error(f"Damaged {path}: {e}; delete it if the settings are those you give now.") from e
    if not isinstance(stored, dict):
        raise error(f"Damaged {path}: not a JSON object; delete it if the settings are those you give now.")
    compared = list(settings) if keys is None else keys
    changed = [f"{k} {stored.get(k)!r} (now {settings.get(k)!r})" for k in compared
               if stored.get(k) != settings.get(k)]
    if keys is None:
        changed += [f"{k} {stored[k]!r} (now not given)" for k in stored if k not in settings]
    if changed:
        raise error(f"{what} was made with other settings: {', '.join(changed)}. {fix}")
