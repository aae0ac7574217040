"""Every container an adapter file may come in (official §3.1 and ours), built from the weights,
for the readers' tests: the product writes only two of them (`official_state_dict`)."""
from __future__ import annotations

from typing import Any

LAYOUTS = ("state_dict", "state_dict_module", "image_proj+face_adapter", "flat", "bare")


def container(weights, layout: str) -> dict[str, Any]:
    """`weights` (AdapterWeights) in one layout: official container 1 (under DDP's `module.` too),
    official container 2 (nested image_proj / face_adapter), our flat keys, or bare official keys."""
    from id_animator.adapter.checkpoint import official_state_dict

    if layout == "image_proj+face_adapter":
        return {"image_proj": dict(weights.resampler),
                "face_adapter": {f"{i}.{k}": t for i, layer in weights.layers.items() for k, t in layer.items()}}
    if layout in ("state_dict", "flat"):
        return official_state_dict(weights, layout)
    official = official_state_dict(weights, "state_dict")["state_dict"]
    if layout == "state_dict_module":
        return {"state_dict": {f"module.{k}": t for k, t in official.items()}}
    if layout == "bare":
        return official
    raise ValueError(f"unknown layout {layout!r}")
