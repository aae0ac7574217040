"""Export (train/export.py): animator.ckpt in the official layout + .safetensors, each read back by
our loader bit-equal before it is kept; the `export` command on states and files."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from id_animator.adapter.checkpoint import load_adapter_checkpoint, official_state_dict
from id_animator.adapter.errors import CheckpointError, TrainingError
from id_animator.adapter.layer_map import LAYERS
from id_animator.adapter.resampler import Resampler
from id_animator.train import export
from id_animator.train.cli import main as cli_main
from id_animator.train.model import AdapterConfig, FaceAdapter, ResamplerConfig, initial_adapter
from support.layouts import container

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config() -> AdapterConfig:
    widths = {layer.official_index: layer.channels // 10 for layer in LAYERS}  # 32/64/128
    return AdapterConfig(widths=widths, context_dim=32, rank=4,
                         resampler=ResamplerConfig(dim=32, depth=1, dim_head=16, heads=2, num_queries=4,
                                                   embedding_dim=48, output_dim=32))


def one_adamw_step(adapter: FaceAdapter, seed: int = 0) -> None:
    """A simple loss that reaches every trainable tensor (LoRA ups included), one AdamW step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
    clip = torch.randn(1, 257, adapter.config.resampler.embedding_dim, generator=generator)
    loss = adapter.face_tokens(clip).square().mean()
    loss = loss + sum((p - 0.01).square().mean() for p in adapter.trainable_parameters())
    loss.backward()
    optimizer.step()


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def assert_same(weights_a, weights_b) -> None:
    a, b = official_state_dict(weights_a, "flat"), official_state_dict(weights_b, "flat")
    assert list(a) == list(b)
    assert all(bit_equal(a[k], b[k]) for k in a)


def official_load(path) -> FaceAdapter:
    """What the official loader does (§3.1): torch.load, the "state_dict" entry, strip the
    image_proj_model. / adapter_modules. prefixes, Resampler strict, the adapter list by index."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    image_proj = {k.removeprefix("image_proj_model."): v for k, v in state.items() if k.startswith("image_proj_model.")}
    modules = {k.removeprefix("adapter_modules."): v for k, v in state.items() if k.startswith("adapter_modules.")}
    assert len(image_proj) + len(modules) == len(state)  # any other key makes the official loader abort
    target = FaceAdapter(AdapterConfig.sd15())
    assert isinstance(target.image_proj_model, Resampler)
    target.image_proj_model.load_state_dict(image_proj, strict=True)
    target.adapter_modules.load_state_dict(modules, strict=True)
    return target


def test_one_step_then_export_reads_back_bit_equal(tmp_path) -> None:
    adapter = initial_adapter(AdapterConfig.sd15(), "scratch", seed=0)
    before = adapter.to_weights()
    one_adamw_step(adapter)
    trained = adapter.to_weights()
    assert all(not torch.equal(t, before.layers[1][k]) for k, t in trained.layers[1].items())  # all moved

    result = export.export_adapter(adapter, tmp_path)
    assert (result.ckpt.name, result.safetensors.name) == ("animator.ckpt", "animator.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["animator.ckpt", "animator.safetensors"]
    for path in (result.ckpt, result.safetensors):
        assert_same(load_adapter_checkpoint(path), trained)  # SD1.5 default: the strict reader
    raw = torch.load(result.ckpt, map_location="cpu", weights_only=True)
    assert list(raw) == ["state_dict"] and len(raw["state_dict"]) == 211
    assert_same(official_load(result.ckpt).to_weights(), trained)
    assert "211 tensors" in result.summary and "float32" in result.summary


def test_fp16_export_is_the_cast_adapter(tmp_path) -> None:
    adapter = initial_adapter(AdapterConfig.sd15(), "scratch", seed=1)
    one_adamw_step(adapter, seed=1)
    result = export.export_adapter(adapter.to_weights(), tmp_path, "fine", dtype=torch.float16)
    expected = adapter.to_weights().to(torch.float16)
    assert_same(load_adapter_checkpoint(result.ckpt), expected)
    assert_same(load_adapter_checkpoint(result.safetensors), expected)
    assert result.ckpt.stat().st_size < 130e6  # ≈124 MB: half of fp32


def corrupting(real, how):
    """torch.save / safetensors' save_file that write something else than asked."""
    def save(obj, path, *args, **kwargs):
        if how == "flip":  # silent corruption: one value changed
            if "state_dict" in obj:
                inner = dict(obj["state_dict"])
                key = "adapter_modules.31.to_v_face.weight"
                inner[key] = inner[key].clone()
                inner[key].view(-1)[-1] *= -1
                obj = {"state_dict": inner}
            else:  # the flat safetensors layout
                obj = dict(obj)
                obj["image_proj.latents"] = obj["image_proj.latents"].clone()
                obj["image_proj.latents"].view(-1)[3] += 1
        real(obj, path, *args, **kwargs)
        if how == "truncate":
            os.truncate(path, os.path.getsize(path) // 2)
    return save


@pytest.mark.parametrize("writer", ["ckpt", "safetensors"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_a_corrupted_write_is_caught_and_nothing_is_kept(tmp_path, monkeypatch, writer, how) -> None:
    adapter = FaceAdapter(tiny_config())
    first = export.export_adapter(adapter, tmp_path)
    old = {p.name: p.read_bytes() for p in (first.ckpt, first.safetensors)}
    one_adamw_step(adapter)
    if writer == "ckpt":
        monkeypatch.setattr(export.torch, "save", corrupting(torch.save, how))
    else:
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", corrupting(safetensors.torch.save_file, how))
    with pytest.raises(CheckpointError, match="differ from those written|truncated|corrupt|re-download"):
        export.export_adapter(adapter, tmp_path)
    # no temporary left, and the previous export untouched
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old


def test_a_diverged_adapter_is_refused(tmp_path) -> None:
    adapter = FaceAdapter(tiny_config())
    with torch.no_grad():
        adapter.adapter_modules[5].to_k_face.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        export.export_adapter(adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_cli_exports_the_latest_accelerate_state(tmp_path) -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    adapter = FaceAdapter(tiny_config())
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        model, optimizer = accelerator.prepare(adapter, torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-2))
        clip = torch.randn(2, 257, 48, generator=torch.Generator().manual_seed(0))
        for step in (1, 2):
            accelerator.backward(model.face_tokens(clip).square().mean())
            optimizer.step()
            optimizer.zero_grad()
            accelerator.save_state(tmp_path / "run" / "state" / f"step-{step}")
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert (tmp_path / "run" / "state" / "step-2" / "model.safetensors").is_file()

    assert cli_main(["export", str(tmp_path / "run"), "--dtype", "fp16"]) == 0
    out = tmp_path / "run" / "exports" / "step-2"  # the latest state, beside the states
    expected = adapter.to_weights().to(torch.float16)
    for name in ("animator.ckpt", "animator.safetensors"):
        assert_same(load_adapter_checkpoint(out / name, expected=adapter.config.shapes), expected)

    assert cli_main(["export", str(tmp_path / "run" / "state" / "step-1"), "--name", "early"]) == 0
    early = load_adapter_checkpoint(tmp_path / "run" / "exports" / "step-1" / "early.ckpt",
                                    expected=adapter.config.shapes)
    assert not torch.equal(early.resampler["latents"], adapter.to_weights().resampler["latents"])


def test_cli_rewrites_an_adapter_file(tmp_path) -> None:
    adapter = initial_adapter(AdapterConfig.sd15(), "scratch", seed=2)
    source = tmp_path / "trained.bin"
    torch.save(container(adapter.to_weights(), "image_proj+face_adapter"), source)
    with pytest.raises(TrainingError, match="--out"):
        export.run(export_args(source))
    assert cli_main(["export", str(source), "--out", str(tmp_path / "out")]) == 0
    assert_same(load_adapter_checkpoint(tmp_path / "out" / "animator.ckpt"), adapter.to_weights())


def export_args(source, *extra: str):
    import argparse

    parser = argparse.ArgumentParser()
    export.configure(parser)
    return parser.parse_args([str(source), *extra])


def test_cli_help_and_clear_errors(tmp_path, import_root) -> None:
    env = {**os.environ, "PYTHONPATH": str(import_root)}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "id_animator.train", "export", *args],
                              capture_output=True, text=True, env=env, timeout=300)

    shown = cli("--help")
    assert shown.returncode == 0 and "--dtype" in shown.stdout and "RUN_DIR/state/step-N" in shown.stdout
    missing = cli(str(tmp_path / "nowhere" / "animator.ckpt"), "--out", str(tmp_path))
    assert missing.returncode == 1
    assert "error:" in missing.stderr and "no such file" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "empty-run").mkdir()
    not_a_state = cli(str(tmp_path / "empty-run"))
    assert not_a_state.returncode == 1 and "state/step-N" in not_a_state.stderr
    wrong = tmp_path / "motion.safetensors"
    from safetensors.torch import save_file
    save_file({"down_blocks.0.motion_modules.0.temporal_transformer.proj_in.weight": torch.zeros(4, 4)}, wrong)
    refused = cli(str(wrong), "--out", str(tmp_path / "out"))
    assert refused.returncode == 1 and "motion module" in refused.stderr
    assert not (tmp_path / "out").exists()
