"""One loaded model per file for every node that names it, while any of them holds it.

ComfyUI's output cache already serves one node's output again; it does not help two *different*
loader nodes (e.g. two LoadIDAnimator with other adapters) that name the same CLIP ViT-H/14 file,
which would otherwise hold the 2.5 GB tower twice. The table holds its models weakly: it keeps
nothing alive by itself (ComfyUI's cache and the graph decide lifetimes), it only lets a second
loader find the model a first one still holds.
"""
from __future__ import annotations

import os
import weakref
from typing import Callable, TypeVar

Model = TypeVar("Model")

_LOADED: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()


def file_version(path: str) -> tuple[str, int, int]:
    """(real path, mtime ns, size): a file replaced under the same name is a new model."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return real, stat.st_mtime_ns, stat.st_size


def shared_load(kind: str, path: str, load: Callable[[], Model]) -> Model:
    """`load()` unless a model of this kind from this file version is still held somewhere."""
    key = (kind, *file_version(path))
    model = _LOADED.get(key)
    if model is None:
        model = load()
        _LOADED[key] = model
    return model  # type: ignore[return-value]
