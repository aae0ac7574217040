"""UniAnimate's diffusion schedule and starting latent (official `schedules.py`, `diffusion_ddim.py`
and the inference entrances; reference §4.5, §5, pitfalls 7, 8, 16), and how a ComfyUI sampler
reproduces them.

Schedule: `linear_sd` betas β_i = (√0.00085 + i/999·(√0.012 − √0.00085))², rescaled to zero
terminal SNR in √ᾱ space (ᾱ_999 = 0). DDIM with n steps visits t = 1 + k·(1000 // n), descending.

Start: the official sampler treats x_init = q_sample(z_ref, t_prior, n) (the "noise prior") as
x at its first timestep t_0, without renormalising. A ComfyUI sampler with its noise disabled
starts from the LATENT as x in σ-space (x_VE = √(1+σ²)·x_VP) after `process_latent_in` (× the
latent format's 0.18215). So the LATENT that reproduces the official start is
√(1 + σ(t_0)²) · x_init / 0.18215.
"""
from __future__ import annotations

import math

import torch

TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
PRIOR_T_SHORT = 949  # configs/UniAnimate_infer.yaml noise_prior_value
PRIOR_T_LONG = 939  # configs/UniAnimate_infer_long.yaml
OFFSET_NOISE = 0.1  # Diffusion.noise_strength
SD_SCALE = 0.18215  # the SD VAE's scale factor (AutoencoderKL, DC scale_factor)
OFFICIAL_STEPS = 30  # ddim_timesteps in both configs


def alphas_cumprod() -> torch.Tensor:
    """ᾱ_t, t = 0..999, float64: linear_sd betas with zero-terminal-SNR rescaling."""
    i = torch.arange(TIMESTEPS, dtype=torch.float64)
    betas = (math.sqrt(BETA_START) + i / (TIMESTEPS - 1) * (math.sqrt(BETA_END) - math.sqrt(BETA_START))) ** 2
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])  # shift ᾱ_999 to 0, keep ᾱ_0
    return root ** 2


def sigma(t: int) -> float:
    """σ of timestep t in ComfyUI's variance-exploding convention: √((1 − ᾱ)/ᾱ)."""
    alpha = float(alphas_cumprod()[t])
    return math.sqrt((1.0 - alpha) / alpha)


def ddim_timesteps(steps: int) -> list[int]:
    """The official DDIM timesteps, descending (30 steps: 991, 958, …, 1 = 31 model calls),
    equal to ComfyUI's `ddim_uniform` for the same `steps`."""
    stride = TIMESTEPS // steps
    return sorted({min(1 + k, TIMESTEPS - 1) for k in range(0, TIMESTEPS, stride)}, reverse=True)


def noise_prior(reference: torch.Tensor, noise: torch.Tensor, offset: torch.Tensor | None,
                t_prior: int = PRIOR_T_SHORT, long_video: bool = False) -> torch.Tensor:
    """x_init: the reference latent (× 0.18215, [B, 4, 1|F, h, w]) noised to t_prior.

    Offset noise (`offset` [B, 4, F, 1, 1], strength 0.1) is added to the noise before the prior in
    the short entrance and to the result after it in the long one (pitfall 8)."""
    alpha = float(alphas_cumprod()[t_prior])
    if offset is not None and not long_video:
        noise = noise + OFFSET_NOISE * offset
    x = math.sqrt(alpha) * reference + math.sqrt(1.0 - alpha) * noise
    if offset is not None and long_video:
        x = x + OFFSET_NOISE * offset
    return x


def plain_noise(noise: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """x_init without the prior: the noise (with offset noise) as x at the first timestep."""
    return noise if offset is None else noise + OFFSET_NOISE * offset


def starting_latent(x_init: torch.Tensor, first_t: int, scale_factor: float = SD_SCALE) -> torch.Tensor:
    """The LATENT (before ComfyUI's × scale_factor) that a sampler with its noise off starts from
    as the official x at `first_t`."""
    return x_init * math.sqrt(1.0 + sigma(first_t) ** 2) / scale_factor


def draw_noise(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise [B, 4, F, h, w] then offset noise [B, 4, F, 1, 1], in that order, from one CPU
    generator (the official draws n on the CPU and the offset on CUDA; CUDA's stream cannot be
    reproduced on a CPU, so only the order and the distribution are the official ones)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=generator)
    offset = torch.randn(shape[:3] + (1, 1), generator=generator)
    return noise, offset
