"""The test bed is real: ComfyUI 0.30.0 loads the pack, samples a full-size SD1.5 UNet, serves HTTP.
(In-process sampling of the plain graph is checked by test_face_graph.py, whose first run is it.)"""
from __future__ import annotations

import torch

from support.graphs import sampling_graph, saved_latent

OUR_NODES = {"LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter"}


def test_pack_imports_in_process(comfy):
    assert not [p for p in comfy.import_failed if "id_animator" in str(p)], comfy.import_failed
    assert OUR_NODES <= set(comfy.nodes.NODE_CLASS_MAPPINGS)


def test_http_object_info_and_sampling(http_comfy, comfy_base):
    info = http_comfy.get("/object_info")
    assert OUR_NODES <= set(info), sorted(OUR_NODES - set(info))
    assert "KSampler" in info
    log = http_comfy.log()
    assert "IMPORT FAILED" not in log.split("Import times for custom nodes")[-1], log[-3000:]
    history = http_comfy.run(sampling_graph(frames=4, size=64, steps=2, prefix="smoke_http"))
    assert history["status"]["status_str"] == "success", history["status"]
    latent = saved_latent(comfy_base / "output", history["outputs"]["save"])
    assert latent.shape == (4, 4, 8, 8) and torch.isfinite(latent).all()
