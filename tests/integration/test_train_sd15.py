"""The trainer's frozen models (train/sd15.py) from the test bed's full-size random files, offline:
each loader takes every key of its part (counted, and spot-checked tensor for tensor), wrong files
end with a message that says what they are, the text encoder gives (1, 77, 768), the video UNet
has the 16 attn2 layers of adapter/layer_map.py, and the trainer's CLIP path equals ComfyUI's CLIP
vision path (as nodes/face_encode.py computes it) on a real aligned face crop at fp32.

Memory: one full-size model at a time (the UNet + motion module is 5.3 GB in fp32), freed after
each test."""
from __future__ import annotations

import gc
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from id_animator.adapter.errors import CheckpointError, TrainingError
from id_animator.adapter.layer_map import LAYERS
from id_animator.adapter.weights_file import sniff_format
from id_animator.train import sd15
from support.graphs import CLIP_VISION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHECKPOINT = ("checkpoints", "sd15_random_full.safetensors")
MOTION_V2 = ("animatediff_models", "mm_sd_v15_v2.ckpt")
MOTION_V3 = ("animatediff_models", "v3_sd15_mm.ckpt")
VIT_L = ("clip_vision", "CLIP-ViT-L-14-random.safetensors")
SD2_UNET = ("diffusion_models", "sd2_random_unet.safetensors")


def path(model_files, where: tuple[str, str]) -> Path:
    return model_files[where[0]][where[1]]


def file_keys(file: Path, prefix: str = "") -> dict[str, torch.Size]:
    # by content, not suffix: the generated files are named by content key, without one
    with open(file, "rb") as f:
        head = f.read(16)
    if sniff_format(head, file.stat().st_size) == "safetensors":
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(prefix)}
    state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}


def file_tensor(file: Path, key: str) -> torch.Tensor:
    with safe_open(str(file), "pt") as f:
        return f.get_tensor(key)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def checkpoint(model_files) -> Path:
    # the generated files are named by content key; the loaders read the suffix-less path as safetensors
    return path(model_files, CHECKPOINT)


@pytest.fixture(autouse=True)
def _free():
    yield
    gc.collect()


@pytest.fixture(scope="module")
def tokenizer_dir(comfyui_dir: Path) -> Path:
    return comfyui_dir / "comfy" / "sd1_tokenizer"


def test_the_checkpoint_has_no_key_outside_the_three_models(checkpoint):
    assert sd15._unknown_keys(sd15.WeightsFile(checkpoint)) == []


def test_vae_takes_every_first_stage_key(checkpoint):
    vae = sd15.load_vae(checkpoint)
    keys = file_keys(checkpoint, sd15.VAE_PREFIX)
    assert len(vae.state_dict()) == len(keys) == 248
    assert all(not p.requires_grad for p in vae.parameters()) and not vae.training
    assert torch.equal(vae.encoder.conv_in.weight, file_tensor(checkpoint, "first_stage_model.encoder.conv_in.weight").float())
    # the mid-block attention is 1x1 convolutions in LDM and linear layers in diffusers
    q = file_tensor(checkpoint, "first_stage_model.encoder.mid.attn_1.q.weight").float()[:, :, 0, 0]
    assert torch.equal(vae.encoder.mid_block.attentions[0].to_q.weight, q)
    assert vae.config.scaling_factor == 0.18215
    half = sd15.load_vae(checkpoint, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_text_encoder_takes_every_key_and_encodes_77_tokens(checkpoint, tokenizer_dir):
    encoder, tokenizer = sd15.load_text_encoder(checkpoint, tokenizer_dir)
    keys = file_keys(checkpoint, sd15.TEXT_PREFIX)
    # ComfyUI writes the pooled-output projection; SD1.5 never applies it (sd15.UNUSED_TEXT_KEYS)
    assert f"{sd15.TEXT_PREFIX}text_projection.weight" in keys and len(keys) == 197
    assert len(encoder.state_dict()) == len(keys) - 1
    assert all(not p.requires_grad for p in encoder.parameters()) and not encoder.training
    token_embedding = file_tensor(checkpoint, f"{sd15.TEXT_PREFIX}text_model.embeddings.token_embedding.weight")
    assert torch.equal(encoder.embeddings.token_embedding.weight, token_embedding.float())
    empty, caption = (sd15.encode_prompts(encoder, tokenizer, [text]) for text in ("", "a woman smiling, turning her head"))
    assert empty.shape == caption.shape == (1, 77, 768)
    assert torch.isfinite(caption).all() and rel_err(empty, caption) > 1e-2
    ids = tokenizer("a woman", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and ids[3:5] == [49407, 49407]  # BOS, words, EOS padding


def test_missing_tokenizer_asks_for_the_flag(checkpoint, tmp_path: Path):
    assert sd15.default_tokenizer_dir() is None  # this checkout does not sit in ComfyUI/custom_nodes
    with pytest.raises(TrainingError, match="--tokenizer DIR"):
        sd15.load_text_encoder(checkpoint)
    with pytest.raises(TrainingError, match="vocab.json and merges.txt"):
        sd15.load_text_encoder(checkpoint, tmp_path)


def test_default_tokenizer_is_comfyuis_when_the_pack_sits_in_custom_nodes(tmp_path: Path, tokenizer_dir: Path):
    comfyui = tmp_path / "ComfyUI"
    (comfyui / "comfy").mkdir(parents=True)
    (comfyui / "comfy" / "sd1_tokenizer").symlink_to(tokenizer_dir, target_is_directory=True)
    pack = comfyui / "custom_nodes" / "ComfyUI-ID-Animator"
    pack.mkdir(parents=True)
    assert sd15.default_tokenizer_dir(pack) == comfyui / "comfy" / "sd1_tokenizer"
    assert sd15.default_tokenizer_dir(tmp_path / "elsewhere" / "pack") is None
    assert sd15.load_tokenizer(sd15.default_tokenizer_dir(pack)).model_max_length == 77


def test_unet_with_motion_module_v2_takes_every_key(checkpoint, model_files):
    motion = path(model_files, MOTION_V2)
    unet = sd15.load_unet(checkpoint, motion)
    spatial, temporal = file_keys(checkpoint, sd15.UNET_PREFIX), file_keys(motion)
    tables = [k for k in temporal if k.endswith("pos_encoder.pe")]
    assert len(tables) == 42  # two per temporal block; diffusers keeps one (checked equal) per block
    state = unet.state_dict()
    assert len(state) == len(spatial) + len(temporal) - len(tables) // 2
    assert type(unet).__name__ == "UNetMotionModel" and unet.config.use_motion_mid_block
    assert all(not p.requires_grad for p in unet.parameters()) and not unet.training
    attn2 = sorted(name for name, _ in unet.named_modules() if name.endswith("attn2") and "motion" not in name)
    assert attn2 == sorted(layer.diffusers_module for layer in LAYERS)
    to_k = file_tensor(checkpoint, f"{sd15.UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    assert torch.equal(unet.get_submodule(LAYERS[0].diffusers_module).to_k.weight, to_k.float())
    raw = torch.load(str(motion), map_location="cpu", weights_only=True, mmap=True)
    assert torch.equal(unet.down_blocks[1].motion_modules[0].transformer_blocks[0].attn2.to_v.weight,
                       raw["down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0."
                           "attention_blocks.1.to_v.weight"].float())
    with torch.no_grad():  # one timestep per clip, one text row per frame
        out = unet(torch.randn(1, 4, 2, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(2, 77, 768)).sample
    assert out.shape == (1, 4, 2, 8, 8) and torch.isfinite(out).all()


def test_unet_with_motion_module_v3_has_no_mid_block(checkpoint, model_files):
    motion = path(model_files, MOTION_V3)
    unet = sd15.load_unet(checkpoint, motion, dtype=torch.bfloat16)
    temporal = file_keys(motion)
    assert not unet.config.use_motion_mid_block and not any(k.startswith("mid_block.") for k in temporal)
    state = unet.state_dict()
    tables = [k for k in temporal if k.endswith("pos_encoder.pe")]
    assert len([k for k in state if ".motion_modules." in k]) == len(temporal) - len(tables) // 2
    assert not any(k.startswith("mid_block.motion_modules.") for k in state)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}


def test_wrong_files_say_what_they_are(checkpoint, model_files, tmp_path: Path):
    motion = path(model_files, MOTION_V2)
    with pytest.raises(CheckpointError, match="is not an SD1.5 single-file checkpoint.* It looks like an AnimateDiff motion module"):
        sd15.load_vae(motion)
    with pytest.raises(CheckpointError, match="is not an AnimateDiff motion module.* It looks like an SD1.5 model checkpoint"):
        sd15.load_unet(checkpoint, checkpoint)
    with pytest.raises(CheckpointError, match="UNet-only file"):
        sd15.load_vae(path(model_files, SD2_UNET))
    with pytest.raises(CheckpointError, match="is not the CLIP ViT-H/14 image encoder.* It looks like a CLIP ViT-L/14 vision model"):
        sd15.load_image_encoder(path(model_files, VIT_L))
    with pytest.raises(CheckpointError, match="is not the CLIP ViT-H/14 image encoder.* It looks like an SD1.5 model checkpoint"):
        sd15.load_image_encoder(checkpoint)
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"conditioner.embedders.1.model.ln_final.weight": torch.ones(4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(320, 4, 3, 3)}, str(sdxl))
    with pytest.raises(CheckpointError, match="It looks like an SDXL model checkpoint"):
        sd15.load_unet(sdxl, motion)
    sd2 = tmp_path / "sd2.safetensors"
    save_file({"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(320, 1024),
               "model.diffusion_model.input_blocks.0.0.weight": torch.ones(320, 4, 3, 3)}, str(sd2))
    with pytest.raises(CheckpointError, match="1024-wide text"):
        sd15.load_vae(sd2)
    truncated = tmp_path / "truncated.safetensors"
    with open(path(model_files, VIT_L), "rb") as f:
        truncated.write_bytes(f.read(4096))
    with pytest.raises(CheckpointError, match="truncated.safetensors: truncated or partial download.*re-download it"):
        sd15.load_image_encoder(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        sd15.load_vae(tmp_path / "missing.safetensors")


def test_noise_scheduler_is_animatediffs():
    scheduler = sd15.noise_scheduler()
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    assert scheduler.betas[0].item() == pytest.approx(0.00085) and scheduler.betas[-1].item() == pytest.approx(0.012)
    assert torch.allclose(scheduler.betas[1:] - scheduler.betas[:-1], torch.full((999,), (0.012 - 0.00085) / 999), atol=1e-8)


@pytest.fixture(scope="module")
def aligned_crop(model_files) -> np.ndarray:
    from id_animator.adapter.face_detection import FaceDetector, detect_and_align
    from support.photos import astronaut_image

    crop = detect_and_align(FaceDetector(model_files["insightface"]["models/scrfd"]), astronaut_image()).crop
    assert crop.shape == (224, 224, 3) and crop.dtype == np.uint8
    return crop


def test_trainer_clip_path_equals_comfyuis(comfy, model_files, aligned_crop):
    import comfy.clip_vision as comfy_clip_vision  # the in-process ComfyUI's (after the fixture set sys.path)

    face_encode = sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"].__module__]
    vit_h = comfy.folder_paths.get_full_path_or_raise("clip_vision", CLIP_VISION)  # named: ComfyUI goes by suffix
    reference = comfy_clip_vision.load(vit_h)
    with torch.no_grad():
        crops = torch.from_numpy(aligned_crop).float()[None] / 255.0  # as FaceEncode holds them: (B, 224, 224, 3)
        expected = face_encode.clip_penultimate(reference, face_encode.normalize_crops(crops))
    del reference
    gc.collect()
    encoder = sd15.load_image_encoder(vit_h)
    assert all(not p.requires_grad for p in encoder.parameters()) and not encoder.training
    channels_first = torch.from_numpy(aligned_crop).permute(2, 0, 1)[None]
    from_uint8 = sd15.clip_penultimate(encoder, channels_first)
    from_float = sd15.clip_penultimate(encoder, channels_first.float() / 255.0)
    assert from_uint8.shape == expected.shape == (1, 257, 1280)
    print(f"trainer vs ComfyUI CLIP penultimate: rel err {rel_err(from_uint8, expected):.2e}")
    assert rel_err(from_uint8, expected) <= 1e-5
    assert torch.equal(from_uint8, from_float)
    other = sd15.clip_penultimate(encoder, channels_first.flip(-1))  # the mirrored face: a different input
    assert rel_err(other, expected) > 1e-3
