"""The identity bed: the models most in-process tests share, loaded once per test session.

The full-size SD1.5 UNet (UNETLoader, default dtype), the adapter bundle (LoadIDAnimator: the
adapter, CLIP ViT-H/14 and the SCRFD detector) and FACE_EMBEDS of the astronaut and of the mirrored
astronaut (FaceEncode; the same person, different tokens), all through the real nodes of the
in-process ComfyUI. Loading them costs about as much as the tests that use them, so every module
that calls the nodes directly on these models takes them from the bed instead of loading its own.

How a test joins the bed: request the session fixture `identity_bed` (tests/integration/conftest.py)
and read the attributes it needs; each is loaded on first use. The bed never changes them: tests
clone the MODEL (ApplyFaceAdapter does) and never write into the bundle or the embeds. Its users run
one after another (tests/conftest.py orders them) and the bed is released after the last one, so
its models never sit beside the models of the graph tests that follow."""
from __future__ import annotations

from typing import Any, Callable

import torch

from support.graphs import ADAPTER, CLIP_VISION, DETECTOR, UNET


class IdentityBed:
    """Lazily loaded shared models of one in-process ComfyUI; `release()` drops them (a later use
    loads them again)."""

    def __init__(self, comfy: Any) -> None:
        self._comfy = comfy
        self._loaded: dict[str, Any] = {}

    def _get(self, name: str, load: Callable[[], Any]) -> Any:
        if name not in self._loaded:
            self._loaded[name] = load()
        return self._loaded[name]

    @property
    def unet(self) -> Any:
        """MODEL: the test bed's SD1.5 UNet as UNETLoader loads it (fp32 on the CPU)."""
        return self._get("unet", lambda: self._comfy.nodes.UNETLoader().load_unet(UNET, "default")[0])

    @property
    def ida(self) -> Any:
        """ID_ANIMATOR: animator.ckpt, ViT-H/14 and SCRFD as LoadIDAnimator loads them."""
        nodes = self._comfy.nodes.NODE_CLASS_MAPPINGS
        return self._get("ida", lambda: nodes["LoadIDAnimator"].execute(ADAPTER, CLIP_VISION, DETECTOR, "CPU").args[0])

    @property
    def embeds(self) -> Any:
        """FACE_EMBEDS of the astronaut."""
        return self._get("embeds", lambda: self._encode(mirrored=False))

    @property
    def embeds_mirrored(self) -> Any:
        """FACE_EMBEDS of the mirrored astronaut: the same person, another crop, other tokens."""
        return self._get("embeds_mirrored", lambda: self._encode(mirrored=True))

    def _encode(self, mirrored: bool) -> Any:
        from support.photos import astronaut_image

        photo = torch.from_numpy(astronaut_image()).float()[None] / 255.0
        if mirrored:
            photo = photo.flip(2)
        node = self._comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"]
        return node.execute(self.ida, photo, "most confident", 0, "error").args[0]

    def release(self) -> None:
        self._loaded.clear()
