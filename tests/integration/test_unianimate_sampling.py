"""A UniAnimate MODEL sampled by ComfyUI's own sampler (ddim_uniform + euler, CFG 2.5, the first 3
of the official 30 steps; pitfall 16) equals the official DDIM sampler (`DiffusionDDIM` with the
official `UNetSD_UniAnimate`, both imported from the checkout) at fp32 on a reduced-size random
model, from the same noise and noise prior: every step's x0 and the final latent."""
from __future__ import annotations

import importlib
import sys

import pytest
import torch

from support.unianimate_diffusion import official_ddim
from support.unianimate_files import REDUCED
from support.unianimate_official import official_unet

STEPS, RUN = 30, 3  # the official schedule, of which the first RUN steps are sampled
GUIDE = 2.5
FRAMES, SIZE = 4, 64  # pixels; latent 8×8
REL_TOL = 1e-4
# final − x_init is ~1/300 of x after 3 of 30 steps, and ComfyUI steps x in σ-space (277·x_VP):
# float32 rounding of x alone is ~1e-5 of that difference per operation, so it gets a looser bound
# (measured 1.5e-4 on this model)
DELTA_TOL = 1e-3


def pack_module(comfy, name: str):
    pack = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["LoadUniAnimate"].__module__.rsplit(".nodes.", 1)[0]]
    return importlib.import_module(f"{pack.__name__}.{name}")


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    return float((ours - official).abs().max() / official.abs().max())


@pytest.fixture(scope="module")
def models(comfy, cache_dir):
    """The official UNet at a reduced size with random weights everywhere (its zero-initialised
    layers too), and our MODEL built by the pack from the same state dict, fp32."""
    torch.manual_seed(0)
    zero_y = torch.randn(1, 77, 1024)
    official = official_unet(cache_dir, (SIZE, SIZE), zero_y=zero_y, **REDUCED)
    with torch.no_grad():
        for p in official.parameters():
            p.normal_(0.0, 0.05)
    config = pack_module(comfy, "unianimate.config").UniAnimateConfig(**REDUCED)
    state = {k: v.clone() for k, v in official.state_dict().items()}
    patcher = pack_module(comfy, "nodes.unianimate_model").build_model(state, config, torch.float32)
    return official, patcher, zero_y


@pytest.fixture(scope="module")
def inputs():
    generator = torch.Generator().manual_seed(1)
    h = SIZE // 8
    return {"pose": torch.rand(1, 3, FRAMES + 1, SIZE, SIZE, generator=generator),
            "reference": torch.randn(1, 4, 1, h, h, generator=generator),
            "image": torch.randn(1, 1, 1024, generator=generator),
            "noise": torch.randn(1, 4, FRAMES, h, h, generator=generator),
            "offset": torch.randn(1, 4, FRAMES, 1, 1, generator=generator)}


def official_run(official, cache_dir, inputs, timesteps):
    """The official sampler's loop body (ddim_sample) for the first timesteps, x0 of every step."""
    ddim = official_ddim(cache_dir)
    randomref = inputs["reference"].repeat(1, 1, FRAMES, 1, 1)
    x = ddim.q_sample(randomref, torch.tensor([949]), noise=inputs["noise"] + 0.1 * inputs["offset"])
    x_init, x0s = x.clone(), []
    cond = {"y": None, "image": inputs["image"], "local_image": None, "dwpose": inputs["pose"],
            "randomref": randomref}
    uncond = {"y": None, "image": None, "local_image": None, "dwpose": None, "randomref": None}
    with torch.no_grad():
        for t in timesteps:
            x, x0 = ddim.ddim_sample(x, torch.tensor([t]), official, [cond, uncond], guide_scale=GUIDE,
                                     ddim_timesteps=STEPS)
            x0s.append(x0)
    return x_init, x, x0s


def counting_batches(patcher):
    """A clone of `patcher` that records the batch size of every UNet pass."""
    batches = []

    def wrapper(apply_model, args):
        batches.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    counted = patcher.clone()
    counted.set_model_unet_function_wrapper(wrapper)
    return counted, batches


@pytest.mark.parametrize("negative", ["node", "empty"])
def test_ksampler_equals_the_official_ddim(comfy, cache_dir, models, inputs, negative):
    """With UniAnimateConditioning's pair (`node`: zeros flagged absent) KSampler runs the
    conditional and unconditional samples as one batch of two; with an empty negative (`empty`,
    e.g. from another node) as two passes. Both are the official DDIM."""
    from comfy import sample as comfy_sample, samplers as comfy_samplers

    official, patcher, zero_y = models
    prior = pack_module(comfy, "unianimate.noise_prior")
    model_mod = pack_module(comfy, "nodes.unianimate_model")

    sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy_samplers.calculate_sigmas(sampling, "ddim_uniform", STEPS)
    timesteps = [int(sampling.timestep(s)) for s in sigmas[:-1]]
    assert timesteps == prior.ddim_timesteps(STEPS)  # 991, 958, ..., 1: the official 31 calls

    x_init_official, x_official, x0_official = official_run(official, cache_dir, inputs, timesteps[:RUN])
    x_init = prior.noise_prior(inputs["reference"], inputs["noise"], inputs["offset"])
    assert relative_error(x_init, x_init_official) < 1e-6

    conds = {model_mod.POSE_COND: inputs["pose"], model_mod.REFERENCE_COND: inputs["reference"],
             model_mod.IMAGE_COND: inputs["image"]}
    if negative == "node":
        with_flags, without = model_mod.conditioned_pair(conds)
        positive, negative_cond = [[zero_y, with_flags]], [[zero_y.clone(), without]]
    else:
        positive, negative_cond = [[zero_y, conds]], [[zero_y.clone(), {}]]
    latent = prior.starting_latent(x_init, timesteps[0])
    counted, batches = counting_batches(patcher)
    x0_ours = []
    samples = comfy_sample.sample(
        counted, torch.zeros_like(latent), STEPS, GUIDE, "euler", "ddim_uniform", positive, negative_cond, latent,
        denoise=1.0, disable_noise=True, start_step=0, last_step=RUN, force_full_denoise=False,
        callback=lambda step, x0, x, total: x0_ours.append(x0.clone()), disable_pbar=True, seed=0)

    assert batches == ([2] * RUN if negative == "node" else [1] * (2 * RUN)), batches
    assert len(x0_ours) == RUN
    errors = [relative_error(ours, theirs) for ours, theirs in zip(x0_ours, x0_official)]
    assert max(errors) < REL_TOL, errors
    # ComfyUI returns x in σ-space (÷ 0.18215); the official x is x_VP = x_VE / √(1 + σ²)
    sigma_end = float(sigmas[RUN])
    x_ours = samples * prior.SD_SCALE / (1.0 + sigma_end ** 2) ** 0.5
    final, moved = relative_error(x_ours, x_official), relative_error(x_ours - x_init, x_official - x_init_official)
    print(f"x0 per step {errors}, final {final:.2e}, final - x_init {moved:.2e}")
    assert final < REL_TOL and moved < DELTA_TOL
    assert float((x_official - x_init_official).abs().max()) > 1e-3  # the steps did move the latent


LONG_FRAMES, WINDOW, OVERLAP = 6, 4, 2  # windows [0..3] and [2..5], both in ComfyUI and officially


def official_long_run(official, cache_dir, inputs, timesteps):
    """DiffusionDDIMLong (windows re-prepend the reference pose, uniform averaging, CFG after)."""
    ddim = official_ddim(cache_dir, long_video=True)
    randomref = inputs["reference"].repeat(1, 1, LONG_FRAMES, 1, 1)
    x = ddim.q_sample(randomref, torch.tensor([939]), noise=inputs["long_noise"]) + 0.1 * inputs["long_offset"]
    x_init, x0s = x.clone(), []
    cond = {"image": inputs["image"], "dwpose": inputs["long_pose"], "randomref": randomref}
    with torch.no_grad():
        for t in timesteps:
            x, x0 = ddim.ddim_sample(x, torch.tensor([t]), official, [cond, {}], guide_scale=GUIDE,
                                     ddim_timesteps=STEPS, context_size=WINDOW, context_stride=1,
                                     context_overlap=OVERLAP, context_batch_size=1)
            x0s.append(x0)
    return x_init, x, x0s


@pytest.fixture(scope="module")
def long_inputs(inputs):
    generator = torch.Generator().manual_seed(2)
    h = SIZE // 8
    return dict(inputs, long_pose=torch.rand(1, 3, LONG_FRAMES + 1, SIZE, SIZE, generator=generator),
                long_noise=torch.randn(1, 4, LONG_FRAMES, h, h, generator=generator),
                long_offset=torch.randn(1, 4, LONG_FRAMES, 1, 1, generator=generator))


@pytest.fixture(scope="module")
def official_long(models, cache_dir, long_inputs, comfy):
    timesteps = pack_module(comfy, "unianimate.noise_prior").ddim_timesteps(STEPS)[:RUN]
    return official_long_run(models[0], cache_dir, long_inputs, timesteps)


@pytest.mark.parametrize("windows", ["UniAnimateContextWindows", "ContextWindowsManual"])
def test_context_windows_equal_the_official_long_sampler(comfy, models, long_inputs, official_long, windows):
    """Each window sees the reference frame, its own poses and the same reference latent; core's
    own node (dim 2, static windows, flat fusion, its causal anchor frame on) gives the same."""
    from comfy import sample as comfy_sample

    _, patcher, zero_y = models
    prior = pack_module(comfy, "unianimate.noise_prior")
    model_mod = pack_module(comfy, "nodes.unianimate_model")
    inputs = long_inputs
    timesteps = prior.ddim_timesteps(STEPS)[:RUN]
    x_init_official, x_official, x0_official = official_long

    if windows == "UniAnimateContextWindows":
        windowed = comfy.nodes.NODE_CLASS_MAPPINGS[windows].execute(patcher, WINDOW, OVERLAP).args[0]
    else:
        windowed = comfy.nodes.NODE_CLASS_MAPPINGS[windows].execute(
            patcher, WINDOW, OVERLAP, "standard_static", 1, False, "flat", 2, False).args[0]
    x_init = prior.noise_prior(inputs["reference"], inputs["long_noise"], inputs["long_offset"],
                               prior.PRIOR_T_LONG, long_video=True)
    assert relative_error(x_init, x_init_official) < 1e-6
    with_flags, without = model_mod.conditioned_pair(
        {model_mod.POSE_COND: inputs["long_pose"], model_mod.REFERENCE_COND: inputs["reference"],
         model_mod.IMAGE_COND: inputs["image"]})  # as UniAnimateConditioning gives them
    latent = prior.starting_latent(x_init, timesteps[0])
    x0_ours = []
    samples = comfy_sample.sample(
        windowed, torch.zeros_like(latent), STEPS, GUIDE, "euler", "ddim_uniform", [[zero_y, with_flags]],
        [[zero_y.clone(), without]], latent, denoise=1.0, disable_noise=True, start_step=0, last_step=RUN,
        force_full_denoise=False, callback=lambda step, x0, x, total: x0_ours.append(x0.clone()),
        disable_pbar=True, seed=0)
    errors = [relative_error(ours, theirs) for ours, theirs in zip(x0_ours, x0_official)]
    assert len(errors) == RUN and max(errors) < REL_TOL, errors
    sigma_end = float(windowed.get_model_object("model_sampling").sigma(torch.tensor(prior.ddim_timesteps(STEPS)[RUN])))
    x_ours = samples * prior.SD_SCALE / (1.0 + sigma_end ** 2) ** 0.5
    final, moved = relative_error(x_ours, x_official), relative_error(x_ours - x_init, x_official - x_init_official)
    print(f"{windows}: x0 per step {errors}, final {final:.2e}, final - x_init {moved:.2e}")
    assert final < REL_TOL and moved < DELTA_TOL
