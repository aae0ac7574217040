"""The real `train` command in 2 processes on CPU (gloo) through `accelerate launch`.

Tiny models are written to disk as diffusers / transformers model folders (the trainer's second
input form; the SD1.5 single-file loaders have fixed SD1.5 shapes), the data in the formats of the
latents, pool and captions commands. Checks: the two processes end with the same adapter, the
frozen weights are those of the files, and a run of 2 steps resumed for 1 more logs exactly the
losses of an uninterrupted 3-step run and ends with the same adapter.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from support.tiny_models import (
    ADAPTER as TINY_ADAPTER, tiny_image_encoder, tiny_motion_adapter, tiny_text_encoder, tiny_unet2d,
)
from support.train_data import gaussian_moments, write_captions, write_latent_cache, write_pool

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

FRAMES, SIDE = 2, 8
VIDEOS = {"actor/a": [0, 4, 8, 12], "actor/b": [0, 4, 8, 12, 16]}  # stored frames (stride 4): 2 + 2 items
POOL = {"actor/a": [1, 5, 30], "actor/b": [3, 40]}


def write_models(root: Path, tokenizer_dir: Path) -> dict[str, Path]:
    """An SD1.5-layout diffusers folder (unet/, text_encoder/, tokenizer/), a MotionAdapter folder
    and a CLIPVisionModelWithProjection folder, all tiny (training.md §5) and random."""
    torch.manual_seed(0)
    unet, motion = tiny_unet2d(sample_size=SIDE), tiny_motion_adapter()
    text, vision = tiny_text_encoder(), tiny_image_encoder()
    paths = {"checkpoint": root / "sd15", "motion": root / "motion", "vision": root / "vision"}
    unet.save_pretrained(paths["checkpoint"] / "unet")
    text.save_pretrained(paths["checkpoint"] / "text_encoder")
    shutil.copytree(tokenizer_dir, paths["checkpoint"] / "tokenizer")
    motion.save_pretrained(paths["motion"])
    vision.save_pretrained(paths["vision"])
    return paths


def write_data(root: Path) -> dict[str, Path]:
    """LATENTS, POOL and CAPTIONS in the plan's formats (2 videos, 4 random windows an epoch), crops of noise."""
    latents = write_latent_cache(root / "latents", list(VIDEOS.items()), gaussian_moments(1, std_scale=0.1),
                                 frames=FRAMES, side=SIDE, checkpoint="sd15", stride=4)
    pool = write_pool(root / "pool", POOL, lambda _, frame: Image.effect_noise((224, 224), 40 + frame).convert("RGB"))
    captions = write_captions(root / "captions.jsonl", {v: f"person {v[-1]} walks" for v in VIDEOS})
    adapter_config = root / "adapter.json"
    adapter_config.write_text(json.dumps(TINY_ADAPTER))
    return {"latents": latents, "pool": pool, "captions": captions, "adapter_config": adapter_config}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_training")
    return {**write_models(root, comfyui_dir / "comfy" / "sd1_tokenizer"), **write_data(root)}


def launch(files: dict[str, Path], out: Path, import_root: Path, max_steps: int, *extra: str,
           refused: str | None = None) -> float:
    """Run `train` in 2 processes; with `refused`, expect it to fail with that message."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "id_animator.train", "train",
               "--checkpoint", str(files["checkpoint"]), "--motion-module", str(files["motion"]),
               "--image-encoder", str(files["vision"]), "--latents", str(files["latents"]),
               "--pool", str(files["pool"]), "--captions", str(files["captions"]),
               "--adapter-config", str(files["adapter_config"]), "--out", str(out),
               "--batch-size", "1", "--max-steps", str(max_steps), "--save-every", "1", "--log-every", "1",
               "--export-every", "0", "--mixed-precision", "no", "--dataloader-workers", "0",
               "--report-to", "none", "--lr", "1e-3", "--seed", "3", "--init", "scratch",
               "--lr-warmup-steps", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(import_root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - started
    if refused is not None:
        assert result.returncode != 0 and refused in result.stderr, result.stderr[-4000:]
        return seconds
    assert result.returncode == 0, f"train failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return seconds


def losses(out: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in map(json.loads, (out / "loss.jsonl").read_text().splitlines())}


def test_two_processes_agree_keep_frozen_weights_and_resume_exactly(files, tmp_path: Path, import_root: Path):
    from id_animator.train.loop import build_frozen_models, fingerprint, frozen_tensors

    whole, split = tmp_path / "whole", tmp_path / "split"
    seconds = launch(files, whole, import_root, 3)
    print(f"2-process CPU run, 3 steps: {seconds:.1f} s")
    replicas = json.loads((whole / "replicas.json").read_text())
    assert sorted(entry["process"] for entry in replicas) == [0, 1]
    assert replicas[0]["adapter"] == replicas[1]["adapter"], "the two processes ended with different adapters"
    loaded = build_frozen_models(files["checkpoint"], files["motion"], files["vision"])
    assert {entry["frozen"] for entry in replicas} == {fingerprint(frozen_tensors(loaded))}, \
        "frozen weights differ from the files after training"
    # The state holds the adapter at the official keys; it trained.
    state = load_file(str(whole / "state" / "step-3" / "model.safetensors"))
    assert any(key.startswith("image_proj_model.") for key in state)
    assert fingerprint(state) == replicas[0]["adapter"]
    assert sorted(p.name for p in (whole / "exports" / "step-3").iterdir()) == ["animator.ckpt", "animator.safetensors"]
    assert (whole / "loss.png").is_file()
    first = load_file(str(whole / "state" / "step-1" / "model.safetensors"))
    assert any(not torch.equal(first[k], state[k]) for k in state)

    launch(files, split, import_root, 2)
    assert sorted(losses(split)) == [1, 2]
    with (split / "loss.jsonl").open("a") as log:  # a crash in the middle of appending a row
        log.write('{"step": 3, "loss": 0.')
    launch(files, split, import_root, 3, "--resume")
    expected, resumed = losses(whole), losses(split)
    print(f"losses whole {expected}, resumed {resumed}")
    assert expected == resumed, "the resumed run did not reproduce the uninterrupted one's losses"
    assert len(set(expected.values())) == 3
    resumed_replicas = json.loads((split / "replicas.json").read_text())
    assert resumed_replicas[0]["adapter"] == replicas[0]["adapter"]
    # The warmup (constant with 1 warmup step = constant_with_warmup): step 1 ran at lr 0, so the
    # adapter after it is still the initial one; the steps after ran at the full lr.
    from id_animator.train.loop import build_adapter

    initial = build_adapter(loaded.unet, loaded.image_encoder, init="scratch", seed=3, overrides=TINY_ADAPTER)
    assert fingerprint(first) == fingerprint(initial.state_dict()), "step 1 trained: the warmup was ignored"
    rows = [json.loads(line) for line in (whole / "loss.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in rows] == [1e-3, 1e-3, 1e-3]  # the lr after each step's update
    assert json.loads((whole / "state" / "step-3" / "data_stream.json").read_text()) == {
        "world_size": 2, "batch_size": 1, "gradient_accumulation_steps": 1, "seed": 3}
    # A resume with another batch size would read other clips: refused, naming the change.
    launch(files, split, import_root, 4, "--resume", "--batch-size", "2", refused="--batch-size 1 -> 2")
