"""Validation while training (train/validation.py) on the tiny models of training.md §5.

The real `train` command runs in this process on tiny diffusers / transformers model folders (with
a tiny VAE, which validation decodes with), the data in the formats of the latents, pool and
captions commands, and a scorer pack of the real SCRFD detector and a random ArcFace-layout
recogniser (as tests/unit/test_train_score.py). The held-out face is the astronaut photo.

Checks: off by default nothing is written; with --validate-every 2 a 4-step run writes rows at
steps 2 and 4 (the scorer's keys, finite where a number is defined), the plot, the GIFs and the
TensorBoard scalars and images; the losses, the adapter, the optimizer and the RNG states of a
run with validation are bit-identical to those of a run without; a resumed run appends (and
reproduces the uninterrupted run's rows), --validate-at-start adds step 0 once; under 2 processes
one writes; bf16 frozen models render. On the validator itself: the render is deterministic,
depends on the face and on the adapter, leaves the adapter's mode, gradient checkpointing, RNG and
weights as they were; the UNet sees the official [text ‖ face] / [negative ‖ null face] context;
the scores of a video that shows the reference photo are the scorer's (face similarity 1, face
share 1/2).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from id_animator.adapter.errors import TrainingError
from support.arcface import write_arcface
from support.tiny_models import (
    ADAPTER as TINY_ADAPTER, tiny_image_encoder, tiny_motion_adapter, tiny_text_encoder, tiny_unet2d, tiny_vae,
)
from support.train_data import gaussian_moments, write_captions, write_latent_cache, write_pool

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, SIDE = 2, 8
VIDEOS = {"actor/a": [0, 4, 8, 12], "actor/b": [0, 4, 8, 12, 16]}  # 2 + 2 items an epoch
POOL = {"actor/a": [1, 5, 30], "actor/b": [3, 40]}
KEYS = {"step", "face_similarity", "clip_i", "face_share", "seconds", "videos"}
VIDEO_KEYS = {"video", "face", "prompt", "seed", "frames", "frames_with_face", "face_share", "face_similarity",
              "stability", "clip_i"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, comfyui_dir: Path, scrfd_dir: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("validation")
    torch.manual_seed(0)
    unet, motion, text, vision, vae = (tiny_unet2d(sample_size=SIDE), tiny_motion_adapter(), tiny_text_encoder(),
                                       tiny_image_encoder(), tiny_vae())
    paths = {"checkpoint": root / "sd15", "motion": root / "motion", "vision": root / "vision"}
    unet.save_pretrained(paths["checkpoint"] / "unet")
    text.save_pretrained(paths["checkpoint"] / "text_encoder")
    vae.save_pretrained(paths["checkpoint"] / "vae")
    shutil.copytree(comfyui_dir / "comfy" / "sd1_tokenizer", paths["checkpoint"] / "tokenizer")
    motion.save_pretrained(paths["motion"])
    vision.save_pretrained(paths["vision"])
    paths["latents"] = write_latent_cache(root / "latents", list(VIDEOS.items()), gaussian_moments(1, std_scale=0.1),
                                          frames=FRAMES, side=SIDE, checkpoint="sd15", stride=4)
    paths["pool"] = write_pool(root / "pool", POOL,
                               lambda _, frame: Image.effect_noise((224, 224), 40 + frame).convert("RGB"))
    paths["captions"] = write_captions(root / "captions.jsonl", {v: f"person {v[-1]} walks" for v in VIDEOS})
    paths["adapter_config"] = root / "adapter.json"
    paths["adapter_config"].write_text(json.dumps(TINY_ADAPTER))
    pack = root / "pack"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    write_arcface(pack / "w600k_r50.onnx")
    paths["pack"] = pack
    faces = root / "faces"
    faces.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(faces / "astronaut.png")
    paths["faces"] = faces
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("a woman smiles\n\nan astronaut waves\n")
    return paths


def validation_flags(files: dict[str, Path], every: int = 2) -> list[str]:
    return ["--validate-every", str(every), "--validation-faces", str(files["faces"]),
            "--validation-prompts", str(files["prompts"]), "--validation-pack", str(files["pack"]),
            "--validation-frames", "2", "--validation-steps", "2", "--validation-size", "64",
            "--validation-guidance", "2"]


def train(files: dict[str, Path], out: Path, max_steps: int, *extra: str) -> None:
    """The real `train` command in this process, on CPU (accelerate's state reset after)."""
    from accelerate.state import AcceleratorState, GradientState

    from id_animator.train.cli import main

    argv = ["train", "--checkpoint", str(files["checkpoint"]), "--motion-module", str(files["motion"]),
            "--image-encoder", str(files["vision"]), "--latents", str(files["latents"]), "--pool", str(files["pool"]),
            "--captions", str(files["captions"]), "--adapter-config", str(files["adapter_config"]),
            "--out", str(out), "--batch-size", "1", "--max-steps", str(max_steps), "--save-every", "2",
            "--log-every", "1", "--export-every", "0", "--mixed-precision", "no", "--dataloader-workers", "0",
            "--lr", "1e-3", "--seed", "3", "--init", "scratch", *extra]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ACCELERATE_USE_CPU", "1")
        patch.setenv("HF_HUB_OFFLINE", "1")
        # every run starts from the same global RNG states, so that their saved states compare
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        try:
            assert main(argv) == 0
        finally:
            AcceleratorState._reset_state(True)
            GradientState._reset_state()


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory) -> dict[str, Path]:
    """Four-step runs: without validation, with it every 2 steps, and 2 steps resumed to 4 (this one
    with --validate-at-start)."""
    root = tmp_path_factory.mktemp("runs")
    runs = {"off": root / "off", "on": root / "on", "split": root / "split"}
    train(files, runs["off"], 4)
    train(files, runs["on"], 4, *validation_flags(files))
    split = [*validation_flags(files), "--report-to", "none", "--validate-at-start"]
    train(files, runs["split"], 2, *split)
    assert [row["step"] for row in rows(runs["split"])] == [0, 2]
    train(files, runs["split"], 4, *split, "--resume")
    return runs


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]


def test_off_by_default_writes_nothing(runs):
    out = runs["off"]
    assert (out / "loss.png").is_file() and (out / "state" / "step-4").is_dir()
    assert not (out / "validation.jsonl").exists() and not (out / "validation.png").exists()
    assert not (out / "validation").exists()
    assert json.loads((out / "args.json").read_text())["validate_every"] == 0


def test_rows_at_steps_2_and_4_with_the_scorers_keys(runs, files):
    out = runs["on"]
    log = rows(out)
    assert [row["step"] for row in log] == [2, 4]
    for row in log:
        assert set(row) == KEYS
        assert len(row["videos"]) == 2  # one face, two prompts (the empty line skipped)
        assert [v["prompt"] for v in row["videos"]] == ["a woman smiles", "an astronaut waves"]
        assert [v["seed"] for v in row["videos"]] == [0, 1]
        for video in row["videos"]:
            assert set(video) == VIDEO_KEYS
            assert video["face"] == str(files["faces"] / "astronaut.png") and video["frames"] == 2
            assert math.isfinite(video["clip_i"]) and -1 <= video["clip_i"] <= 1
            assert 0 <= video["face_share"] <= 1 and video["frames_with_face"] == round(2 * video["face_share"])
            # random tiny models render no face: the scorer reports that, never a 0 similarity
            assert (video["face_similarity"] is None) == (video["frames_with_face"] == 0)
            gif = out / video["video"]
            with Image.open(gif) as image:
                assert image.size == (64, 64) and image.n_frames == 2
        assert math.isfinite(row["clip_i"]) and row["clip_i"] == pytest.approx(
            np.mean([v["clip_i"] for v in row["videos"]]), abs=1e-6)
        assert row["face_share"] == pytest.approx(np.mean([v["face_share"] for v in row["videos"]]), abs=1e-6)
        assert row["seconds"] > 0
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]
    # the adapter trained between the validations, so the renders moved
    assert log[0]["videos"][0]["clip_i"] != log[1]["videos"][0]["clip_i"]
    with Image.open(out / "validation.png") as plot:
        assert plot.size == (768, 320)
        assert np.asarray(plot.convert("RGB")).std() > 10  # drawn, not blank


def test_tensorboard_holds_the_scalars_and_the_frames(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((runs["on"] / "logs").rglob("events.out.tfevents.*"))
    assert events
    tags: dict[str, set] = {"scalars": set(), "images": set()}
    steps: dict[str, list[int]] = {}
    for event in events:
        accumulator = EventAccumulator(str(event), size_guidance={"images": 0, "scalars": 0})
        accumulator.Reload()
        for kind in tags:
            tags[kind] |= set(accumulator.Tags()[kind])
        for tag in accumulator.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in accumulator.Scalars(tag))
        for tag in accumulator.Tags()["images"]:
            steps.setdefault(tag, []).extend(e.step for e in accumulator.Images(tag))
    assert {"validation/clip_i", "validation/face_share"} <= tags["scalars"], tags
    faced = any(row["face_similarity"] is not None for row in rows(runs["on"]))
    assert ("validation/face_similarity" in tags["scalars"]) == faced  # no face, no number: nothing logged
    assert sorted(steps["validation/clip_i"]) == [2, 4]
    images = {tag for tag in tags["images"] if tag.startswith("validation/")}
    assert len(images) == 2, images  # one per video: its frames side by side
    assert all(sorted(steps[tag]) == [2, 4] for tag in images)


def test_validation_does_not_disturb_training(runs):
    off, on = runs["off"], runs["on"]

    def losses(out: Path) -> list[tuple]:
        return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (out / "loss.jsonl").read_text().splitlines())]

    assert losses(on) == losses(off) and len(losses(off)) == 4
    for step in (2, 4):
        a, b = off / "state" / f"step-{step}", on / "state" / f"step-{step}"
        model_a, model_b = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert model_a.keys() == model_b.keys()
        assert all(torch.equal(model_a[k], model_b[k]) for k in model_a), f"the adapters differ at step {step}"
        for name in ("optimizer.bin", "random_states_0.pkl"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs at step {step}"
    replicas = [json.loads((out / "replicas.json").read_text()) for out in (off, on)]
    assert replicas[0] == replicas[1]  # the same adapter and frozen weights at the end


def test_a_resumed_run_appends_and_reproduces_the_uninterrupted_rows(runs):
    split, whole = rows(runs["split"]), rows(runs["on"])
    assert [row["step"] for row in split] == [0, 2, 4]  # the step-0 baseline not again on --resume
    assert split[0]["clip_i"] != split[1]["clip_i"]  # step 0 is the initial adapter
    split = split[1:]
    for a, b in zip(split, whole):
        a.pop("seconds"), b.pop("seconds")
    assert split == whole  # the resumed run rendered and scored exactly what the uninterrupted one did
    assert (runs["split"] / "validation.png").is_file()
    assert not list((runs["split"] / "logs").rglob("events.out.tfevents.*"))  # --report-to none


def test_a_torn_last_row_and_rows_past_the_state_are_dropped_on_resume(runs, files, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(runs["split"], out)
    shutil.rmtree(out / "state" / "step-4")  # the run "died" after validating step 4, before saving it
    with (out / "validation.jsonl").open("a") as log:
        log.write('{"step": 5, "face_simil')  # and while appending a row
    train(files, out, 4, *validation_flags(files), "--report-to", "none", "--resume")
    assert [row["step"] for row in rows(out)] == [0, 2, 4]


# --- The validator, directly ---------------------------------------------------------------------


@pytest.fixture
def bed(files, tmp_path):
    """A Validator on the frozen models of the files and a tiny adapter installed on their UNet."""
    import accelerate
    from accelerate.state import AcceleratorState, GradientState

    from id_animator.train import loop, validation

    frozen = loop.build_frozen_models(files["checkpoint"], files["motion"], files["vision"])
    adapter = loop.build_adapter(frozen.unet, frozen.image_encoder, init="scratch", seed=1, overrides=TINY_ADAPTER)
    adapter.install(frozen.unet)
    parser = argparse.ArgumentParser()
    validation.configure(parser)
    faces = files["faces"] / "astronaut.png", tmp_path / "flipped.png"  # a second face, mirrored
    Image.fromarray(np.ascontiguousarray(skimage_data.astronaut()[:, ::-1])).save(faces[1])
    args = parser.parse_args(validation_flags(files, every=3)[:2] + [
        "--validation-faces", *map(str, faces), *validation_flags(files)[4:]])
    settings = validation.settings_of(args)
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        yield validation.Validator(settings, accelerator, frozen, files["checkpoint"], tmp_path / "run",
                                   torch.float32, 10), \
            adapter, frozen
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_the_render_is_deterministic_and_leaves_training_state_alone(bed):
    from id_animator.train.loop import fingerprint, frozen_tensors

    validator, adapter, frozen = bed
    assert [(face.name, prompt) for face, prompt in validator.settings.videos] == [
        ("astronaut.png", "a woman smiles"), ("flipped.png", "an astronaut waves")]
    assert [validator.due(step) for step in (1, 3, 5, 6, 10)] == [False, True, False, True, True]  # and the last
    frozen.unet.enable_gradient_checkpointing()
    adapter.train()
    weights = fingerprint(adapter.state_dict())
    frozen_before = fingerprint(frozen_tensors(frozen))
    cpu_rng = torch.get_rng_state()
    first = validator.run(adapter, 3)
    assert adapter.training and frozen.unet.is_gradient_checkpointing
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert fingerprint(adapter.state_dict()) == weights and fingerprint(frozen_tensors(frozen)) == frozen_before
    assert torch.is_grad_enabled()

    with torch.random.fork_rng():
        torch.manual_seed(1234)  # another global RNG state: the render must not depend on it
        again = validator.render(adapter, 0)
    assert np.array_equal(again, validator.render(adapter, 0))
    second = validator.run(adapter, 6)
    first.pop("seconds"), second.pop("seconds")
    assert first["videos"] == [{**v, "video": v["video"].replace("step-6", "step-3")} for v in second["videos"]]
    assert (validator.out / "validation" / "step-3" / "0-astronaut.gif").read_bytes() == \
        (validator.out / "validation" / "step-6" / "0-astronaut.gif").read_bytes()

    # The face branch is in the render: other face K/V render otherwise.
    with torch.no_grad():
        for processor in adapter.face_processors().values():
            processor.to_v_face.weight.mul_(3)
    assert not np.array_equal(validator.render(adapter, 0), again)


def test_the_face_decides_the_render(bed):
    validator, adapter, _ = bed
    # the two videos differ in prompt and seed too: hold those fixed and swap only the face
    features = [face.features for face in validator.faces]
    one = validator.render(adapter, 0)
    validator.faces[0].features = features[1]
    other = validator.render(adapter, 0)
    validator.faces[0].features = features[0]
    assert not np.array_equal(one, other)
    assert np.array_equal(one, validator.render(adapter, 0))


def test_a_video_showing_the_reference_scores_as_the_scorer_says(bed):
    validator, _, _ = bed
    astronaut = skimage_data.astronaut()
    rocket = np.asarray(Image.fromarray(skimage_data.rocket()).resize((512, 512)))
    record = validator.score(0, np.stack([astronaut, rocket]))
    summary = record["summary"]
    assert summary["frames"] == 2 and summary["frames_with_face"] == 1 and summary["face_share"] == 0.5
    assert summary["face_similarity"] == pytest.approx(1.0, abs=1e-5)  # the reference photo itself
    assert math.isfinite(summary["clip_i"])


def test_settings_are_checked_before_training(files, tmp_path):
    from id_animator.train import validation

    parser = argparse.ArgumentParser()
    validation.configure(parser)
    assert validation.settings_of(parser.parse_args([])) is None  # off by default
    for argv, message in [
        (["--validate-every", "2"], "needs --validation-faces"),
        (["--validate-every", "2", "--validation-faces", str(files["faces"])], "needs --validation-pack"),
        (["--validate-every", "-1"], "give 0"),
        (["--validate-every", "2", "--validation-faces", str(tmp_path / "none.png"), "--validation-pack", "p"],
         "no such photo or folder"),
        (["--validate-every", "2", "--validation-faces", str(tmp_path), "--validation-pack", "p"], "holds no photo"),
        (["--validate-every", "2", "--validation-faces", str(files["faces"]), "--validation-pack", "p",
          "--validation-prompts", str(tmp_path / "missing.txt")], "no such file"),
    ]:
        with pytest.raises(TrainingError, match=message):
            validation.settings_of(parser.parse_args(argv))
    settings = validation.settings_of(parser.parse_args(
        ["--validate-every", "5", "--validation-faces", str(files["faces"]), "--validation-pack", "p",
         "--validation-prompts", "one prompt", str(files["prompts"])]))
    assert settings.prompts == ("one prompt", "a woman smiles", "an astronaut waves")
    assert len(settings.videos) == 3 and {face for face, _ in settings.videos} == {files["faces"] / "astronaut.png"}


def test_under_two_processes_only_the_main_one_renders_and_writes(files, tmp_path, import_root: Path):
    """The real `train` command in 2 processes on CPU (gloo) through `accelerate launch`."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "id_animator.train", "train",
               "--checkpoint", str(files["checkpoint"]), "--motion-module", str(files["motion"]),
               "--image-encoder", str(files["vision"]), "--latents", str(files["latents"]),
               "--pool", str(files["pool"]), "--captions", str(files["captions"]),
               "--adapter-config", str(files["adapter_config"]), "--out", str(out), "--batch-size", "1",
               "--max-steps", "1", "--save-every", "0", "--export-every", "0", "--log-every", "1",
               "--mixed-precision", "no", "--dataloader-workers", "0", "--report-to", "none", "--init", "scratch",
               *validation_flags(files, every=1)]
    env = {**os.environ, "PYTHONPATH": str(import_root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    log = rows(out)
    assert [row["step"] for row in log] == [1]  # once: one process wrote
    assert all(len(row["videos"]) == 2 and math.isfinite(row["clip_i"]) for row in log)
    assert result.stderr.count("Validation at step 1") == 1
    replicas = json.loads((out / "replicas.json").read_text())
    assert len(replicas) == 2 and replicas[0]["adapter"] == replicas[1]["adapter"]


def test_mixed_precision_renders_with_the_frozen_models_in_bf16(files, tmp_path):
    """The frozen models (and the VAE) in bf16, the adapter in fp32, outside training's autocast."""
    out = tmp_path / "run"
    train(files, out, 1, *validation_flags(files, every=1), "--mixed-precision", "bf16", "--report-to", "none")
    (row,) = rows(out)
    assert row["step"] == 1 and math.isfinite(row["clip_i"]) and len(row["videos"]) == 2


def test_the_unet_sees_the_official_context(bed):
    """[negative ‖ null face] rows then [prompt ‖ face] rows, one per frame (official §7.4), the null
    face from zero normalised pixels (official §4.4), as training's dropped face."""
    from id_animator.train.sd15 import encode_prompts

    validator, adapter, frozen = bed
    seen = []
    hook = frozen.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].detach().clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            validator.render(adapter, 0)
    finally:
        hook.remove()
    assert len(seen) == 2  # one UNet call per DDIM step, the uncond and cond passes batched
    context = seen[0]
    frames, queries = validator.settings.frames, adapter.config.resampler.num_queries
    assert context.shape == (2 * frames, 77 + queries, frozen.unet.config.cross_attention_dim)
    with torch.no_grad():
        text, negative = encode_prompts(frozen.text_encoder, frozen.tokenizer,
                                        ["a woman smiles", validator.settings.negative_prompt])
        null = frozen.image_encoder(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True)
        null_face = adapter.face_tokens(null.hidden_states[-2])[0]
        face = adapter.face_tokens(validator.faces[0].features)[0]
    for row in range(frames):
        torch.testing.assert_close(context[row, :77], negative, rtol=0, atol=0)
        torch.testing.assert_close(context[row, 77:], null_face, rtol=0, atol=1e-6)
        torch.testing.assert_close(context[frames + row, :77], text, rtol=0, atol=0)
        torch.testing.assert_close(context[frames + row, 77:], face, rtol=0, atol=0)
    assert not torch.allclose(face, null_face, atol=1e-3)
