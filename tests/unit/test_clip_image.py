"""adapter/clip_image.py against transformers' PIL CLIPImageProcessor (the processor of the
official pipeline) on odd, non-square frame sizes, at fp32 within 1e-5."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from id_animator.adapter.clip_image import CLIP_MEAN, clip_geometry, clip_pixels, normalize, resized_size

pytestmark = pytest.mark.unit

# (height, width): 403 * 224 / 300 = 300.9 is where truncating and rounding part ways
SIZES = [(300, 403), (403, 300), (225, 1000), (224, 224), (500, 227), (97, 131), (719, 1281)]


def reference_processor():
    transformers = pytest.importorskip("transformers")
    # transformers 5 splits the PIL processor out (the default one resizes with torchvision)
    cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if cls is None:
        from transformers import CLIPImageProcessor as cls
    return cls()


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # smooth plus noise: bicubic overshoot and clipping both happen
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x[..., None] / 7.0 + np.arange(3)) * np.cos(y[..., None] / 11.0)
    return np.clip(base + rng.normal(0, 25, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("height, width", SIZES)
def test_equal_to_clip_image_processor(height: int, width: int):
    processor = reference_processor()
    image = photo(height, width, seed=height * width)
    expected = torch.from_numpy(np.asarray(processor(images=[image], return_tensors="np")["pixel_values"]))
    ours = clip_pixels([image])
    assert ours.shape == expected.shape == (1, 3, 224, 224)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-5, atol=1e-5)


def test_the_long_side_is_truncated_not_rounded():
    assert resized_size(300, 403) == (224, 300)  # 300.906 -> 300 (rounding would give 301)
    assert resized_size(403, 300) == (300, 224)
    assert resized_size(97, 131) == (224, 302)  # upsampled: 302.5 -> 302


def test_geometry_and_normalisation_compose():
    image = photo(300, 403, seed=1)
    crop = clip_geometry(image)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    from_float = normalize(torch.from_numpy(crop.copy()).permute(2, 0, 1)[None].float() / 255)
    torch.testing.assert_close(clip_pixels([image]), from_float)
    grey = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert normalize(grey).abs().max() < 1e-7  # the official null face normalises to zero


def test_the_scorer_uses_the_same_geometry():
    pytest.importorskip("einops")
    from id_animator.train.score import ClipImage

    image = photo(403, 300, seed=2)
    assert np.array_equal(ClipImage.process(image), clip_geometry(image))
