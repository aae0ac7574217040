"""A trained adapter in real ComfyUI: fine-tune the test bed's animator.ckpt for one AdamW step with
train/model.py, export it with train/export.py, then load both exported files through the real
LoadIDAnimator node and sample with them (files written into the base's models/id_animator/ for
this module only)."""
from __future__ import annotations

import pytest
import torch

from id_animator.adapter.checkpoint import load_adapter_checkpoint
from id_animator.train.export import export_adapter
from id_animator.train.model import AdapterConfig, initial_adapter
from support.graphs import ADAPTER, face_video_graph, saved_latent

NAME = "ida_test_trained"


@pytest.fixture(scope="module")
def trained(comfy, comfy_base) -> dict:
    """The exported files' names, and the weights they should hold."""
    folder = comfy_base / "models" / "id_animator"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        adapter = initial_adapter(AdapterConfig.sd15(), folder / ADAPTER, seed=0)  # fine-tuning start
        optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
        clip = torch.randn(1, 257, 1280, generator=torch.Generator().manual_seed(0))
        loss = adapter.face_tokens(clip).square().mean()
        loss = loss + sum(p.square().mean() for p in adapter.trainable_parameters())  # reaches every tensor
        loss.backward()
        optimizer.step()
        result = export_adapter(adapter, folder, NAME)
        weights = adapter.to_weights()
        del adapter, optimizer
    finally:
        torch.set_num_threads(threads)
    comfy.folder_paths.filename_list_cache.clear()
    yield {"ckpt": result.ckpt.name, "safetensors": result.safetensors.name, "weights": weights}
    for path in (result.ckpt, result.safetensors):
        path.unlink(missing_ok=True)
    comfy.folder_paths.filename_list_cache.clear()


def with_adapter(graph: dict, adapter_name: str) -> dict:
    graph["ida"]["inputs"]["adapter_name"] = adapter_name
    return graph


def test_exported_adapter_loads_in_load_id_animator_and_samples(comfy, comfy_base, trained) -> None:
    folder, out = comfy_base / "models" / "id_animator", comfy_base / "output"
    original = load_adapter_checkpoint(folder / ADAPTER)
    # the step moved every tensor: the exported file is not the test bed's adapter
    assert all(not torch.equal(t, original.layers[31][k]) for k, t in trained["weights"].layers[31].items())

    runs = {}
    for name, prefix in ((trained["ckpt"], "trained_ckpt"), (trained["safetensors"], "trained_st"),
                         (ADAPTER, "original")):
        result = comfy.run(with_adapter(face_video_graph(frames=4, weight=1.0, prefix=prefix), name))
        assert result.success, (name, result.error_message)
        runs[name] = saved_latent(out, result.outputs["save"])
    ckpt, safetensors, before = runs[trained["ckpt"]], runs[trained["safetensors"]], runs[ADAPTER]
    assert bool(torch.isfinite(ckpt).all()) and ckpt.shape == before.shape
    assert torch.equal(ckpt, safetensors)  # the two files hold the same adapter
    assert not torch.equal(ckpt, before)  # and it is the trained one that sampled
