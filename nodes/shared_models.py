"""One loaded model per file for every node that names it, while any of them holds it; and small
results of a model forward kept per file version, so that reloading the same files never repeats
the forward.

ComfyUI's output cache already serves one node's output again; it does not help two *different*
loader nodes (e.g. two LoadIDAnimator with other adapters) that name the same CLIP ViT-H/14 file,
which would otherwise hold the 2.5 GB tower twice. The table holds its models weakly: it keeps
nothing alive by itself (ComfyUI's cache and the graph decide lifetimes), it only lets a second
loader find the model a first one still holds.
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict
from typing import Callable, TypeVar

from .types import ComputedOnce

Model = TypeVar("Model")

_LOADED: "weakref.WeakValueDictionary[tuple, object]" = weakref.WeakValueDictionary()
# Small results (the unconditional face tokens: 16x768 floats, 48 KB), the last KEPT_RESULTS kept strongly.
KEPT_RESULTS = 16
_RESULTS: "OrderedDict[tuple, ComputedOnce]" = OrderedDict()


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


def result_of_files(kind: str, *paths: str) -> ComputedOnce:
    """The one slot for a result that depends only on these file versions, e.g. the unconditional
    face tokens of a CLIP file and an adapter file: a loader run again on the same files (ComfyUI
    dropped its output, or a second loader names them) gets the slot already filled."""
    key = (kind, *(file_version(path) for path in paths))
    slot = _RESULTS.pop(key, None) or ComputedOnce()
    _RESULTS[key] = slot  # most recently used last
    while len(_RESULTS) > KEPT_RESULTS:
        _RESULTS.popitem(last=False)
    return slot
