"""Fixtures for tests inside a real ComfyUI 0.30.0: generated models, a base folder with this
pack installed, an in-process executor and an HTTP server.

Memory (a 16 GB machine must run the whole suite): tests that use the in-process ComfyUI run
first, then those that use the HTTP server, and each is released right after its last test (the
in-process one also after each module), so at most one ComfyUI holds models at any time."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.harness import InProcessComfy, OnDemandServer, make_base
from support import models, photos

REPO = Path(__file__).resolve().parents[2]
RELEASED_AFTER_LAST_USE = ("comfy", "http_comfy")


@pytest.fixture(scope="session")
def model_files(cache_dir, comfyui_dir, scrfd_dir) -> dict[str, dict[str, Path]]:
    return models.ensure_models(cache_dir, comfyui_dir, scrfd_dir)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, model_files, scrfd_dir) -> Path:
    base = make_base(tmp_path_factory.mktemp("comfy-base"), REPO, model_files)
    photos.write_inputs(base / "input", scrfd_dir)
    return base


@pytest.fixture(scope="session")
def comfy(comfyui_dir, comfy_base) -> InProcessComfy:
    """ComfyUI in this process (one per test session: ComfyUI keeps global state)."""
    return InProcessComfy(comfyui_dir, comfy_base)


@pytest.fixture(scope="session")
def http_comfy(comfyui_dir, comfy_base, request):
    server = OnDemandServer(comfyui_dir, comfy_base, lambda: request.session.testsfailed,
                            comfy_base.parent / "comfyui-failed.log")
    yield server
    server.release()


def _released_after(item, nextitem, name: str) -> bool:
    """After its last test in a row; the in-process ComfyUI also after each module's last test, so
    that one module's models (kept by its fixtures and ComfyUI's cache) never add to the next's."""
    if name not in item.fixturenames:
        return False
    if nextitem is None or name not in nextitem.fixturenames:
        return True
    return name == "comfy" and nextitem.module is not item.module


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    last_users = [item.funcargs.get(name) for name in RELEASED_AFTER_LAST_USE if _released_after(item, nextitem, name)]
    yield  # module fixtures (which may hold models) are torn down, and tests/conftest.py clears funcargs
    for holder in last_users:
        if holder is not None:
            holder.release()
