"""UniAnimateLatentFrames: a 5-D UniAnimate LATENT as a batch of frames for VAEDecode."""
from __future__ import annotations

from comfy_api.latest import io

from ..unianimate.errors import UniAnimateInputError
from .unianimate_model import frames_to_batch


class UniAnimateLatentFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniAnimateLatentFrames",
            display_name="UniAnimate Latent to Frames",
            category="id_animator/unianimate",
            description="Turns the sampled video latent [1, 4, frames, h, w] into one latent per frame, so "
                        "VAEDecode with the SD2.1 VAE decodes every frame (it would decode frame 0 only).",
            search_aliases=["unianimate", "video latent", "frames to batch", "decode video"],
            inputs=[io.Latent.Input("samples", tooltip="From KSampler on a UniAnimate MODEL.")],
            outputs=[io.Latent.Output(display_name="frames", tooltip="[frames, 4, h, w], for VAEDecode.")],
        )

    @classmethod
    def execute(cls, samples: dict) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 5:
            raise UniAnimateInputError(
                f"UniAnimateLatentFrames: the latent has shape {list(latent.shape)}; it takes the 5-D video "
                "latent [batch, 4, frames, h, w] of a UniAnimate sampling run (a 4-D latent already holds "
                "one frame per batch entry: give it to VAEDecode directly).")
        out = {k: v for k, v in samples.items() if k not in ("samples", "noise_mask", "batch_index")}
        out["samples"] = frames_to_batch(latent)
        return io.NodeOutput(out)
