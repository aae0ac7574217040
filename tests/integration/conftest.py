"""Fixtures for tests inside a real ComfyUI 0.30.0: generated models, a base folder with this
pack installed, an in-process executor and an HTTP server."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.harness import InProcessComfy, make_base, serving
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
    with serving(comfyui_dir, comfy_base, lambda: request.session.testsfailed,
                 comfy_base.parent / "comfyui-failed.log") as server:
        yield server
