"""Fixtures for tests inside a real ComfyUI 0.30.0: generated models, a base folder with this
pack installed, an in-process executor and an HTTP server."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from support.harness import HttpComfy, InProcessComfy, make_base
from support import models, photos

REPO = Path(__file__).resolve().parents[2]


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
    server = HttpComfy(comfyui_dir, comfy_base)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
        failed = request.session.testsfailed
        if failed:
            kept = comfy_base.parent / "comfyui-failed.log"
            shutil.copy(server.log_path, kept)
            print(f"\nComfyUI log kept at {kept}")
