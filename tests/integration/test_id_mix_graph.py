"""IDMix's blend_end = -1 means "no morph", through a real graph (its own module: the graph loads
its own UNet and encoder, which must not sit beside another module's)."""
from __future__ import annotations

import torch

from support.graphs import id_mix_graph, saved_latent


def test_id_mix_blend_end_minus_one_is_a_static_blend(comfy, comfy_base):
    def latent(blend_end: float, prefix: str):
        result = comfy.run(id_mix_graph(0.3, blend_end, prefix=prefix))
        assert result.success, result.error_message
        return saved_latent(comfy_base / "output", result.outputs["save"])

    unset = latent(-1.0, "mix_unset")
    assert torch.equal(unset, latent(0.3, "mix_static"))
    assert not torch.allclose(unset, latent(1.0, "mix_morph"))  # a morph shows in this graph
