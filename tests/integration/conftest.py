"""Fixtures for tests inside a real ComfyUI 0.30.0: generated models, a base folder with this
pack installed, an in-process executor and an HTTP server."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .harness import HttpComfy, InProcessComfy, make_base
from . import models

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def model_files(cache_dir, comfyui_dir, scrfd_dir) -> dict[str, dict[str, Path]]:
    """Every model folder of the test bed, keyed like ComfyUI's `models/` layout."""
    import sys
    if str(comfyui_dir) not in sys.path:
        sys.path.insert(0, str(comfyui_dir))
    return {
        "diffusion_models": {"sd15_random_unet.safetensors": models.sd15_unet(cache_dir)},
        "text_encoders": {"clip_l_random.safetensors": models.clip_l_text(cache_dir)},
        "clip_vision": {"CLIP-ViT-H-14-random.safetensors": models.clip_vision_h(cache_dir)},
        "id_animator": {"animator.ckpt": models.id_animator_checkpoint(cache_dir)},
        "insightface": {"models/scrfd": models.scrfd_pack(cache_dir, scrfd_dir)},
    }


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, model_files) -> Path:
    return make_base(tmp_path_factory.mktemp("comfy-base"), REPO, model_files)


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
