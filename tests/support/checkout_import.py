"""Importing files of a third-party checkout (the official UniAnimate, OpenS2V-Nexus) by path,
without leaving their absolute module names behind.

Their files import top-level names such as `utils` and `dwpose`, and packages that are not installed
here (stubbed). Left in sys.modules, those names would shadow real packages for every later test in
the process (ComfyUI has its own `utils`), and a real package already there would shadow theirs.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
from collections.abc import Iterable, Iterator
from pathlib import Path


def load_file(name: str, path: Path) -> types.ModuleType:
    """The module of the file `path`, executed under `name` (put in sys.modules first, so that its
    own imports of `name` find it)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def namespace_package(name: str, folder: Path) -> types.ModuleType:
    """`folder` as the package `name` in sys.modules. Their folders have no `__init__.py`, and a
    namespace package found on sys.path loses to any regular package of the same name."""
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    return package


@contextlib.contextmanager
def visible_while_importing(packages: Iterable[str], stubs: dict[str, types.ModuleType] | None = None
                            ) -> Iterator[None]:
    """Inside the block the `stubs` are in sys.modules; after it, every module named in `packages`
    or under one of them (`utils` covers `utils.registry`), and every stub, is back as it was
    (removed when it was not there). Modules imported inside keep the references they took."""
    stubs = stubs or {}
    watched = (*packages, *stubs)

    def covered(key: str) -> bool:
        return any(key == name or key.startswith(name + ".") for name in watched)

    saved = {key: module for key, module in sys.modules.items() if covered(key)}
    try:
        sys.modules.update(stubs)
        yield
    finally:
        for key in [key for key in sys.modules if covered(key)]:
            del sys.modules[key]
        sys.modules.update(saved)
