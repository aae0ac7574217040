"""LoadUniAnimate in real ComfyUI: a full-size random file in the official layout (1544 tensors,
≈1.42 B parameters, every one consumed) becomes a MODEL that ComfyUI's sampler samples at tiny
size with context windows, and a file of the same layout at reduced width loads at its own size;
wrong files and bad conditioning inputs end in messages that say what to do, and the executor
keeps working (RELIABILITY.md). Only the first test holds the full-size model (about 3 GB); the
checks whose outcome does not depend on the width use the reduced file."""
from __future__ import annotations

import importlib
import os
import pickle
import sys

import pytest
import torch

from support.graphs import CLIP_VISION
from support.unianimate_files import REDUCED, ensure_unianimate_file

GOOD, SMALL = "unianimate_random.safetensors", "unianimate_reduced.safetensors"
PARAMETERS = 1_416_564_300  # official §1.3 / pitfall 17
FRAMES, SIZE = 4, 64


class RunsCode:
    """A pickle that runs os.system when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def files(comfy, comfy_base, cache_dir):
    """models/unianimate/: the good file, the reduced one, an SD1.5 UNet, a truncated download and
    a code pickle."""
    folder = comfy_base / "models" / "unianimate"
    folder.mkdir(exist_ok=True)
    good = ensure_unianimate_file(cache_dir)
    names = {"good": GOOD, "small": SMALL, "sd2": "uni_sd2_unet.safetensors",
             "truncated": "uni_truncated.safetensors", "pickle": "uni_code.pth"}
    if not (folder / GOOD).exists():
        (folder / GOOD).symlink_to(good)
        (folder / SMALL).symlink_to(ensure_unianimate_file(cache_dir, sizes=REDUCED))
        (folder / names["sd2"]).symlink_to((comfy_base / "models" / "diffusion_models" / "sd2_random_unet.safetensors").resolve())
        with good.open("rb") as f:
            (folder / names["truncated"]).write_bytes(f.read(50_000_000))
        with (folder / names["pickle"]).open("wb") as f:
            pickle.dump({"state_dict": RunsCode(comfy_base / "UNIANIMATE_CODE_RAN")}, f)
    comfy.folder_paths.filename_list_cache.clear()
    return names


def pack_module(comfy, name: str):
    pack = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["LoadUniAnimate"].__module__.rsplit(".nodes.", 1)[0]]
    return importlib.import_module(f"{pack.__name__}.{name}")


@pytest.fixture(scope="module")
def loaded(comfy, files):
    """The reduced file as LoadUniAnimate loads it."""
    return comfy.nodes.NODE_CLASS_MAPPINGS["LoadUniAnimate"].execute(files["small"], "fp16").args[0]


def test_full_size_file_loads_and_samples_with_windows(comfy, files, cache_dir):
    from comfy import sample as comfy_sample
    from safetensors import safe_open

    nodes = comfy.nodes.NODE_CLASS_MAPPINGS
    patcher = nodes["LoadUniAnimate"].execute(files["good"], "fp16").args[0]  # released when the test ends
    unet = patcher.model.diffusion_model
    assert unet.config == pack_module(comfy, "unianimate.config").OFFICIAL
    state = unet.state_dict()
    assert len(state) == 1544 and sum(t.numel() for t in state.values()) == PARAMETERS
    with safe_open(str(ensure_unianimate_file(cache_dir)), "pt") as f:
        assert set(f.keys()) == set(state)  # every key of the file consumed, nothing left at init
        for key in ("input_blocks.0.0.weight", "output_blocks.11.2.transformer_blocks.0.attn2.to_v.weight",
                    "randomref_embedding_after2.layers.0.1.net.2.bias", "out.2.weight"):
            assert torch.equal(state[key].cpu(), f.get_tensor(key)), key
    assert type(patcher.model).__name__ == "UniAnimateModel" and patcher.model.model_type.name == "V_PREDICTION"
    assert float(patcher.get_model_object("model_sampling").sigma_max) > 4000  # zero terminal SNR (≈ 4519)

    model_mod, prior = pack_module(comfy, "nodes.unianimate_model"), pack_module(comfy, "unianimate.noise_prior")
    windowed = nodes["UniAnimateContextWindows"].execute(patcher, 2, 1).args[0]
    generator = torch.Generator().manual_seed(0)
    zero_y = torch.randn(1, 77, 1024, generator=generator)
    positive = [[zero_y, {model_mod.POSE_COND: torch.rand(1, 3, FRAMES + 1, SIZE, SIZE, generator=generator),
                          model_mod.REFERENCE_COND: torch.randn(1, 4, 1, SIZE // 8, SIZE // 8, generator=generator),
                          model_mod.IMAGE_COND: torch.randn(1, 1, 1024, generator=generator)}]]
    noise, offset = prior.draw_noise((1, 4, FRAMES, SIZE // 8, SIZE // 8), seed=0)
    latent = prior.starting_latent(prior.plain_noise(noise, offset), prior.ddim_timesteps(2)[0])
    windows = []
    original = model_mod.ComfyUniAnimateUNet.forward

    def recording(self, x, timesteps, context=None, control=None, transformer_options=None, **conds):
        window = (transformer_options or {}).get("context_window")
        windows.append((None if window is None else list(window.index_list), x.shape[2],
                        None if conds.get("pose") is None else conds["pose"].shape[2]))
        return original(self, x, timesteps, context, control, transformer_options, **conds)

    model_mod.ComfyUniAnimateUNet.forward = recording
    try:
        samples = comfy_sample.sample(windowed, torch.zeros_like(latent), 2, 2.5, "euler", "ddim_uniform", positive,
                                      [[zero_y.clone(), {}]], latent, disable_noise=True, disable_pbar=True, seed=0)
    finally:
        model_mod.ComfyUniAnimateUNet.forward = original
    assert samples.shape == (1, 4, FRAMES, SIZE // 8, SIZE // 8) and torch.isfinite(samples).all()
    assert not torch.allclose(samples, latent)
    # 2 steps x 3 windows ([0,1], [1,2], [2,3]) x (cond, uncond): 2 frames each; cond calls get
    # the reference pose + the window's 2 poses
    assert sorted({tuple(w) for w, _, _ in windows}) == [(0, 1), (1, 2), (2, 3)]
    assert len(windows) == 12 and all(f == 2 for _, f, _ in windows)
    assert sorted(p for _, _, p in windows if p is not None) == [3] * 6


def test_a_reduced_file_loads_at_its_own_size(comfy, loaded, files, comfy_base):
    from safetensors import safe_open

    config = pack_module(comfy, "unianimate.config").UniAnimateConfig(**REDUCED)
    unet = loaded.model.diffusion_model
    assert unet.config == config and config != pack_module(comfy, "unianimate.config").OFFICIAL
    with safe_open(str(comfy_base / "models" / "unianimate" / files["small"]), "pt") as f:
        assert set(f.keys()) == set(unet.state_dict()) and len(unet.state_dict()) < 1544


@pytest.mark.parametrize("frames, size", [(FRAMES - 1, SIZE), (FRAMES, SIZE * 2)])
def test_a_latent_that_does_not_match_the_poses_is_explained(comfy, loaded, frames, size):
    from comfy import sample as comfy_sample

    model_mod = pack_module(comfy, "nodes.unianimate_model")
    zero_y = torch.zeros(1, 77, 1024)
    positive = [[zero_y, {model_mod.POSE_COND: torch.rand(1, 3, FRAMES + 1, SIZE, SIZE)}]]
    latent = torch.randn(1, 4, frames, size // 8, size // 8)
    with pytest.raises(pack_module(comfy, "unianimate.errors").UniAnimateInputError) as error:
        comfy_sample.sample(loaded, torch.zeros_like(latent), 1, 2.5, "euler", "ddim_uniform", positive,
                            [[zero_y, {}]], latent, disable_noise=True, disable_pbar=True, seed=0)
    message = str(error.value)
    assert f"{FRAMES} pose frames of {SIZE}×{SIZE} px but the latent has {frames} frames of {size}×{size}" in message
    assert "Sample the LATENT that the same UniAnimateConditioning made" in message


def test_latent_frames_continue_an_earlier_segment(comfy):
    """unianimate_continue: segment 2's frames come after segment 1's; a segment at another size is
    explained."""
    node = comfy.nodes.NODE_CLASS_MAPPINGS["UniAnimateLatentFrames"]
    first, second = torch.randn(1, 4, 3, 8, 8), torch.randn(1, 4, 2, 8, 8)
    segment_1 = node.execute({"samples": first}).result[0]
    video = node.execute({"samples": second}, previous=segment_1).result[0]["samples"]
    assert video.shape == (5, 4, 8, 8)
    assert torch.equal(video[:3], first[0].movedim(1, 0)) and torch.equal(video[3:], second[0].movedim(1, 0))
    with pytest.raises(pack_module(comfy, "unianimate.errors").UniAnimateInputError,
                       match=r"`previous` has shape \[3, 4, 8, 8\] but this segment's frames are \[2, 4, 16, 16\]"):
        node.execute({"samples": torch.randn(1, 4, 2, 16, 16)}, previous=segment_1)


def test_apply_face_adapter_refuses_a_unianimate_model(comfy, loaded):
    apply = pack_module(comfy, "nodes.apply_face_adapter")
    with pytest.raises(apply.IDAnimatorError, match="cross-attention is 1024 wide") as error:
        apply.check_sd15(loaded)
    assert "no face adapter has been trained for UniAnimate" in str(error.value)


def run_error(comfy, graph: dict) -> tuple[str, str, str]:
    result = comfy.run(graph)
    assert not result.success and result.error, result.node_errors
    return result.error["node_id"], result.error["exception_type"].rsplit(".", 1)[-1], result.error["exception_message"]


def loader_graph(name: str) -> dict:
    return {"uni": {"class_type": "LoadUniAnimate", "inputs": {"unet_name": name, "weight_dtype": "fp16"}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["uni", 0]}}}


@pytest.mark.parametrize("case, words", [
    ("sd2", ("not the UniAnimate UNet", "unianimate_16f_32f_non_ema_223000.pth")),
    ("truncated", ("truncated",)),
    ("pickle", ("refused", "NOT loaded")),
])
def test_wrong_files_are_named(comfy, comfy_base, files, case, words):
    node, kind, message = run_error(comfy, loader_graph(files[case]))
    assert (node, kind) == ("uni", "CheckpointError"), message
    assert files[case] in message
    for word in words:
        assert word in message, (word, message)
    assert not (comfy_base / "UNIANIMATE_CODE_RAN").exists(), "code in a pickle ran"


def conditioning_graph(pose_size: tuple[int, int], ref_pose_size: tuple[int, int], ref_poses: int = 1) -> dict:
    """UniAnimateConditioning fed from the SD1.5 test checkpoint's VAE and CLIP (checks on the
    images come first) and the ViT-H CLIP vision file."""
    (pw, ph), (rw, rh) = pose_size, ref_pose_size
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15_random_full.safetensors"}},
        "vision": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": CLIP_VISION}},
        "photo": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}},
        "poses": {"class_type": "EmptyImage", "inputs": {"width": pw, "height": ph, "batch_size": 3, "color": 0}},
        "ref_pose": {"class_type": "EmptyImage", "inputs": {"width": rw, "height": rh, "batch_size": ref_poses,
                                                            "color": 0}},
        "cond": {"class_type": "UniAnimateConditioning", "inputs": {
            "reference_image": ["photo", 0], "pose_frames": ["poses", 0], "reference_pose": ["ref_pose", 0],
            "vae": ["ckpt", 2], "clip": ["ckpt", 1], "clip_vision": ["vision", 0], "mode": "randomref",
            "start": "noise prior", "seed": 0, "steps": 30}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["cond", 2]}},
    }


@pytest.mark.parametrize("pose_size, ref_pose_size, ref_poses, words", [
    ((96, 64), (96, 64), 1, ("96×64", "divisible by 64", "128×64")),
    ((64, 64), (128, 64), 1, ("reference_pose is 128×64", "64×64")),
    ((64, 64), (64, 64), 2, ("reference_pose holds 2 images",)),
    ((64, 64), (64, 64), 1, ("SD2.1 text encoder", "768")),  # the SD1.5 CLIP-L instead of SD2.1's
])
def test_bad_conditioning_inputs_are_explained(comfy, files, pose_size, ref_pose_size, ref_poses, words):
    node, kind, message = run_error(comfy, conditioning_graph(pose_size, ref_pose_size, ref_poses))
    assert (node, kind) == ("cond", "UniAnimateInputError"), message
    for word in words:
        assert word in message, (word, message)


def test_executor_survives_the_failures(comfy, files):
    """After every failure above, the same executor still runs a good load (of the reduced file:
    the full-size one is the first test's)."""
    result = comfy.run(loader_graph(files["small"]))
    assert result.success, result.error_message
