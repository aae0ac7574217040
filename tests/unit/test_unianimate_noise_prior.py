"""UniAnimate's schedule, DDIM timesteps, noise prior and CLIP resize equal the official code's
(imported from the checkout; reference §4.2, §4.5, §5, pitfalls 8, 15, 16)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from id_animator.unianimate import noise_prior as prior
from id_animator.unianimate.preprocess import CLIP_MEAN, CLIP_STD, clip_pixels, pil_resize
from support.unianimate_diffusion import official_ddim


@pytest.fixture(scope="module")
def ddim(cache_dir):
    return official_ddim(cache_dir)


def test_schedule_is_the_official_one(ddim):
    ours = prior.alphas_cumprod()
    assert ours.dtype == torch.float64 and ours[-1] == 0.0
    torch.testing.assert_close(ours, ddim.alphas_cumprod, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("steps", [30, 25, 50, 3])
def test_ddim_timesteps_are_the_official_loop(ddim, steps):
    stride = ddim.num_timesteps // steps
    official = (1 + torch.arange(0, ddim.num_timesteps, stride)).clamp(0, ddim.num_timesteps - 1).flip(0)
    assert prior.ddim_timesteps(steps) == official.tolist()
    if steps == 30:
        assert len(official) == 31 and official[0] == 991 and official[-1] == 1  # pitfall 7


def test_noise_prior_is_q_sample(ddim):
    reference = torch.randn(1, 4, 1, 8, 8)
    noise, offset = prior.draw_noise((1, 4, 5, 8, 8), seed=3)
    official = ddim.q_sample(reference.repeat(1, 1, 5, 1, 1), torch.tensor([949]), noise=noise + 0.1 * offset)
    torch.testing.assert_close(prior.noise_prior(reference, noise, offset), official, rtol=1e-6, atol=1e-7)
    # the long entrance: prior at 939 on the plain noise, offset noise added after it
    official_long = ddim.q_sample(reference.repeat(1, 1, 5, 1, 1), torch.tensor([939]), noise=noise) + 0.1 * offset
    torch.testing.assert_close(prior.noise_prior(reference, noise, offset, prior.PRIOR_T_LONG, long_video=True),
                               official_long, rtol=1e-6, atol=1e-7)


def test_starting_latent_scale():
    x = torch.ones(1)
    alpha = float(prior.alphas_cumprod()[991])
    assert float(prior.starting_latent(x, 991)) == pytest.approx(1 / alpha ** 0.5 / prior.SD_SCALE, rel=1e-6)  # float32 x


def test_clip_resize_is_the_official_stretched_bilinear():
    """The official CLIP input: PIL bilinear to 224×224 (stretched, no crop), ToTensor, Normalize."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (300, 200, 3), dtype=np.uint8)
    resized = np.asarray(Image.fromarray(photo).resize((224, 224), Image.BILINEAR)).astype(np.float32) / 255
    official = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(CLIP_MEAN).view(3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(3, 1, 1)
    ours = clip_pixels(torch.from_numpy(photo).float()[None] / 255.0)
    assert ours.shape == (1, 3, 224, 224)
    assert torch.equal(ours[0], official)


def test_pil_resize_keeps_an_image_of_the_size():
    image = torch.rand(2, 64, 128, 3)
    assert torch.equal(pil_resize(image, 64, 128), image)
    assert pil_resize(image, 32, 32).shape == (2, 32, 32, 3)
