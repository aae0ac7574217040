"""The `train` command's guards: every learning-rate schedule with its warmup, the required
--init, the resume refusal of a changed data stream, and the replica comparison.

The schedules run on a real AdamW over one tensor, stepped once per optimizer step as the loop
steps them; the expected values are the schedules' formulas, computed here independently."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from id_animator.adapter.errors import TrainingError
from id_animator.train import loop
from id_animator.train.lr_schedule import SCHEDULES, make_lr_scheduler

pytest.importorskip("diffusers")

LR, WARMUP, STEPS = 1e-4, 4, 20


def lrs(name: str, warmup: int = WARMUP, steps: int = STEPS, **kwargs) -> list[float]:
    """The learning rate of optimizer steps 1..steps (the value each step's update uses)."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    scheduler = make_lr_scheduler(optimizer, name, warmup_steps=warmup, training_steps=steps, **kwargs)
    used = []
    for _ in range(steps):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return used


def expected(name: str, step: int, warmup: int = WARMUP, steps: int = STEPS) -> float:
    """The schedules' definitions (step counted from 0 as LambdaLR counts)."""
    if step < warmup:
        return LR * step / warmup
    progress = (step - warmup) / (steps - warmup)
    return LR * {"constant": 1.0, "constant_with_warmup": 1.0, "linear": 1 - progress,
                 "cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                 "cosine_with_restarts": 0.5 * (1 + math.cos(math.pi * (progress % 1.0))),
                 "polynomial": 1 - progress}[name]  # polynomial: power 1, lr_end 1e-7 (below)


@pytest.mark.parametrize("name", [s for s in SCHEDULES if s != "piecewise_constant"])
def test_every_schedule_runs_with_its_warmup(name: str):
    used = lrs(name)
    assert used[0] == 0.0 and used[WARMUP] == pytest.approx(LR), f"{name}: warmup not honoured: {used[:6]}"
    assert used[1] == pytest.approx(LR / WARMUP), name
    tolerance = 1.1e-7 if name == "polynomial" else 1e-12  # polynomial decays to lr_end = 1e-7
    for step, value in enumerate(used):
        assert abs(value - expected(name, step)) <= tolerance, f"{name} step {step}: {value} vs {expected(name, step)}"
    if name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert used[-1] < 0.1 * LR, f"{name} did not decay over the run: {used[-1]}"


def test_constant_without_warmup_and_piecewise_rules():
    assert lrs("constant", warmup=0) == [LR] * STEPS
    used = lrs("piecewise_constant", warmup=0, step_rules="1:5,0.1:10,0.01")
    assert used == pytest.approx([LR] * 5 + [LR * 0.1] * 5 + [LR * 0.01] * 10)


@pytest.mark.parametrize("name, kwargs, message", [
    ("piecewise_constant", {"warmup": 0}, "needs --lr-step-rules"),
    ("piecewise_constant", {"step_rules": "1:5,0.1"}, "has no warmup"),
    ("cosine", {"step_rules": "1:5,0.1"}, "only read by --lr-scheduler piecewise_constant"),
    ("cosine", {"warmup": 20}, "would never decay"),
    ("warmup_cosine", {}, "not a schedule"),
])
def test_bad_schedule_settings_are_refused(name: str, kwargs: dict, message: str):
    with pytest.raises(TrainingError, match=message):
        lrs(name, **kwargs)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(exit_on_error=False)
    loop.configure(parser)
    return parser


REQUIRED = ["--checkpoint", "c", "--motion-module", "m", "--image-encoder", "i", "--latents", "l",
            "--pool", "p", "--captions", "t", "--out", "o"]


def test_init_is_required_and_its_help_names_the_papers_start(capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(REQUIRED)
    assert "--init" in capsys.readouterr().err
    assert parser.parse_args([*REQUIRED, "--init", "scratch"]).init == "scratch"
    init = next(action for action in parser._actions if "--init" in action.option_strings)
    assert init.required and "ip-adapter-plus-face_sd15" in init.help and "scratch" in init.help
    with pytest.raises((SystemExit, argparse.ArgumentError), match="invalid choice: 'cosin'"):
        parser.parse_args([*REQUIRED, "--init", "scratch", "--lr-scheduler", "cosin"])


def _args(**changes) -> argparse.Namespace:
    args = _parser().parse_args([*REQUIRED, "--init", "scratch"])
    for key, value in changes.items():
        setattr(args, key, value)
    return args


def test_resume_refuses_a_changed_data_stream_naming_it(tmp_path: Path):
    state = tmp_path / "state" / "step-10"
    state.mkdir(parents=True)
    saved = loop.data_stream(_args(batch_size=2, gradient_accumulation_steps=4), world_size=8)
    (state / loop.STREAM_FILE).write_text(json.dumps(saved))
    loop.check_data_stream(state, tmp_path, dict(saved))  # the same settings resume
    for changes, world, named in [({"batch_size": 1}, 8, "--batch-size 2 -> 1"),
                                  ({"gradient_accumulation_steps": 2}, 8, "--gradient-accumulation-steps 4 -> 2"),
                                  ({}, 4, "processes (accelerate --num_processes) 8 -> 4"),
                                  ({"seed": 9}, 8, "--seed 0 -> 9")]:
        stream = loop.data_stream(_args(**{"batch_size": 2, "gradient_accumulation_steps": 4, **changes}), world)
        with pytest.raises(TrainingError, match=named.replace("(", r"\(").replace(")", r"\)")):
            loop.check_data_stream(state, tmp_path, stream)
    # A state without the file falls back on the run's args.json (which now records world_size).
    (state / loop.STREAM_FILE).unlink()
    (tmp_path / "args.json").write_text(json.dumps({**vars(_args()), "world_size": 2}, default=str))
    with pytest.raises(TrainingError, match=r"\(accelerate --num_processes\) 2 -> 1; --batch-size 2 -> 8"):
        loop.check_data_stream(state, tmp_path, loop.data_stream(_args(batch_size=8), 1))


def test_replicas_compare_adapter_and_frozen_fingerprints(tmp_path: Path):
    same = [{"process": r, "adapter": "a", "frozen": "f"} for r in range(2)]
    loop.compare_replicas(same, tmp_path, expected_frozen="f")
    with pytest.raises(TrainingError, match="adapter differs between processes"):
        loop.compare_replicas([same[0], {**same[1], "adapter": "b"}], tmp_path)
    with pytest.raises(TrainingError, match="frozen models differ between processes"):
        loop.compare_replicas([same[0], {**same[1], "frozen": "g"}], tmp_path, expected_frozen="f")
    with pytest.raises(TrainingError, match="frozen models changed during training"):
        loop.compare_replicas(same, tmp_path, expected_frozen="e")


def test_a_deepspeed_export_writes_the_fp32_masters_not_the_rounded_module(tmp_path: Path):
    """DeepSpeed runs the module in bf16 and keeps fp32 masters in the optimizer: the export must
    write the masters. `loop.adapter_with` (the export's path once `fp32_masters` has gathered
    them) is checked on a bf16 module with known fp32 masters; without DeepSpeed no gathering."""
    from id_animator.adapter.checkpoint import load_adapter_checkpoint, official_state_dict
    from id_animator.train.export import export_adapter
    from id_animator.train.model import AdapterConfig, ResamplerConfig, initial_adapter

    config = AdapterConfig(widths={i: 32 for i in range(1, 32, 2)}, context_dim=32, rank=4,
                           resampler=ResamplerConfig(dim=32, depth=1, dim_head=16, heads=2, num_queries=4,
                                                     embedding_dim=48, output_dim=32))
    adapter = initial_adapter(config, "scratch", seed=0)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-3)  # values bf16 cannot hold
    masters = {name: p.detach().clone() for name, p in adapter.named_parameters()}
    adapter.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module
    assert any(not torch.equal(p.float(), masters[n]) for n, p in adapter.named_parameters())

    class NotDeepSpeed:
        distributed_type = "MULTI_GPU"

    assert loop.fp32_masters(NotDeepSpeed(), adapter) is None
    result = export_adapter(loop.adapter_with(adapter, masters), tmp_path)
    written = official_state_dict(load_adapter_checkpoint(result.ckpt, expected=config.shapes), "flat")
    expected = official_state_dict(loop.adapter_with(adapter, masters), "flat")
    assert all(written[k].dtype == torch.float32 and torch.equal(written[k], expected[k]) for k in expected)
    rounded = official_state_dict(adapter.to_weights(), "flat")
    assert any(not torch.equal(written[k], rounded[k].float()) for k in written), "the export is bf16-rounded"
    assert all(p.dtype == torch.bfloat16 for p in adapter.parameters()), "the module was left changed"
    with pytest.raises(TrainingError, match="gathered weights name"):
        loop.adapter_with(adapter, {})


def test_the_reference_exclusion_reaches_the_training_set(tmp_path: Path):
    """--reference-exclude-window MARGIN is parsed and handed to the training set; off by default."""
    from PIL import Image

    from support.train_data import gaussian_moments, write_captions, write_latent_cache, write_pool

    latents = write_latent_cache(tmp_path / "latents", [("v", list(range(0, 80, 4)))], gaussian_moments(0),
                                 frames=16, side=1, checkpoint="t", stride=4)
    pool = write_pool(tmp_path / "pool", {"v": [79]}, lambda _, frame: Image.new("RGB", (224, 224)))
    captions = write_captions(tmp_path / "c.jsonl", {"v": "a"})
    args = _parser().parse_args([*REQUIRED, "--init", "scratch", "--reference-exclude-window", "8"])
    assert args.reference_exclude_window == 8 and _args().reference_exclude_window is None
    # windows at frames 0-60, 4-64, ..., 16-76 of 80; face 79 lies outside the first three ± 8
    for margin, starts in ((None, (0, 1, 2, 3, 4)), (8, (0, 1, 2))):
        dataset = loop.build_training_set(latents, pool, captions, seed=0, null_text_rate=0.2, null_image_rate=0.0,
                                          reference_exclude_window=margin)
        assert dataset.exclude_margin == margin and dataset.sources[0].starts == starts
