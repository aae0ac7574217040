"""The four nodes in a real graph: load, encode a real photo, patch, sample."""
from __future__ import annotations

import torch

from support.graphs import face_video_graph, sampling_graph, saved_latent


def test_identity_changes_the_video_and_weight_zero_does_not(comfy, comfy_base):
    plain = comfy.run(sampling_graph(frames=4, prefix="plain"))
    assert plain.success, plain.error_message
    face = comfy.run(face_video_graph(frames=4, weight=0.8))
    assert face.success, face.error_message
    off = comfy.run(face_video_graph(frames=4, weight=0.0, lora_strength=0.0, prefix="off"))
    assert off.success, off.error_message
    out = comfy_base / "output"
    plain_latent = saved_latent(out, plain.outputs["save"])
    # the in-process ComfyUI samples the full-size UNet (test_smoke's in-process sampling, merged here)
    assert plain_latent.shape == (4, 4, 8, 8) and bool(torch.isfinite(plain_latent).all()) and plain_latent.std() > 0
    assert torch.equal(saved_latent(out, off.outputs["save"]), plain_latent)
    assert not torch.allclose(saved_latent(out, face.outputs["save"]), plain_latent)
