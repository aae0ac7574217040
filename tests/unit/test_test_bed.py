"""The test bed cannot go stale or cross clones (issue 13, item 6): a generated model's cache key
follows the code that generates it, and `id_animator` is imported from this checkout."""
from __future__ import annotations

from pathlib import Path

import id_animator.adapter
from support import models

REPO = Path(__file__).resolve().parents[2]


def sd15_unet(path: Path) -> None:  # the same name as the real generator, another body
    models.save_file(models.random_like_shapes(models.sd15_unet_shapes(), seed=16), str(path))


def test_key_follows_the_generator_code(comfyui_dir):
    real = models.Recipe(models.sd15_unet)
    assert models.content_key(real, comfyui_dir) == models.content_key(models.Recipe(models.sd15_unet), comfyui_dir)
    assert models.content_key(models.Recipe(sd15_unet), comfyui_dir) != models.content_key(real, comfyui_dir)
    keys = {models.content_key(recipe, comfyui_dir) for recipe in models.GENERATORS.values()}
    assert len(keys) == len(models.GENERATORS), "two generators share a cache file"


def test_key_follows_the_helpers_a_generator_calls(comfyui_dir, monkeypatch):
    before = models.content_key(models.Recipe(models.animatediff_v2), comfyui_dir)
    monkeypatch.setattr(models.motion_models, "SD15_LEVEL_CHANNELS", (320, 640, 1280, 1281))  # named one call deep
    assert models.content_key(models.Recipe(models.animatediff_v2), comfyui_dir) != before


def test_id_animator_is_this_checkout():
    assert Path(id_animator.adapter.__path__[0]).resolve() == REPO / "adapter"
