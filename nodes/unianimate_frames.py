"""UniAnimateLatentFrames: a 5-D UniAnimate LATENT as a batch of frames for VAEDecode, after the
frames of an earlier segment when a video is continued from its last frame."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..unianimate.errors import UniAnimateInputError
from .unianimate_model import frames_to_batch


def continued(previous: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The earlier segment's frames [F1, 4, h, w], then this one's [F2, 4, h, w]."""
    if previous.ndim != 4 or previous.shape[1:] != frames.shape[1:]:
        raise UniAnimateInputError(
            f"UniAnimateLatentFrames: `previous` has shape {list(previous.shape)} but this segment's frames are "
            f"{list(frames.shape)}; connect the `frames` output of the earlier segment's UniAnimate Latent to "
            "Frames, sampled at the same size (same pose width and height).")
    return torch.cat([previous.to(frames), frames])


class UniAnimateLatentFrames(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniAnimateLatentFrames",
            display_name="UniAnimate Latent to Frames",
            category="id_animator/unianimate",
            description="Turns the sampled video latent [1, 4, frames, h, w] into one latent per frame, so "
                        "VAEDecode with the SD2.1 VAE decodes every frame (it would decode frame 0 only). "
                        "Continuing a video from its last frame: give the earlier segment's frames as "
                        "`previous`, and they come first.",
            search_aliases=["unianimate", "video latent", "frames to batch", "decode video", "continue video"],
            inputs=[io.Latent.Input("samples", tooltip="From KSampler on a UniAnimate MODEL."),
                    io.Latent.Input("previous", optional=True,
                                    tooltip="The frames of the segment this one continues (its UniAnimate Latent "
                                            "to Frames output): the result is those frames, then these.")],
            outputs=[io.Latent.Output(display_name="frames", tooltip="[frames, 4, h, w], for VAEDecode.")],
        )

    @classmethod
    def execute(cls, samples: dict, previous: dict | None = None) -> io.NodeOutput:
        latent = samples["samples"]
        if latent.ndim != 5:
            raise UniAnimateInputError(
                f"UniAnimateLatentFrames: the latent has shape {list(latent.shape)}; it takes the 5-D video "
                "latent [batch, 4, frames, h, w] of a UniAnimate sampling run (a 4-D latent already holds "
                "one frame per batch entry: give it to VAEDecode directly).")
        out = {k: v for k, v in samples.items() if k not in ("samples", "noise_mask", "batch_index")}
        frames = frames_to_batch(latent)
        out["samples"] = frames if previous is None else continued(previous["samples"], frames)
        return io.NodeOutput(out)
