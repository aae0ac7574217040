"""UniAnimateContextWindows: core context windows set up as the official long-video sampler."""
from __future__ import annotations

import comfy.context_windows as cw
from comfy_api.latest import io

from ..unianimate.errors import UniAnimateInputError
from .unianimate_model import FRAME_DIM


class UniAnimateContextWindows(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="UniAnimateContextWindows",
            display_name="UniAnimate Context Windows",
            category="id_animator/unianimate",
            description="Long videos: ComfyUI's context windows as the official long-video sampler uses them "
                        "(windows of 32 frames overlapping by 8, the last one ending at the last frame, the "
                        "same at every step, averaged uniformly). Every window sees the reference frame.",
            search_aliases=["unianimate", "long video", "context windows", "sliding window"],
            inputs=[
                io.Model.Input("model", tooltip="A UniAnimate MODEL (from Load UniAnimate)."),
                io.Int.Input("context_length", default=32, min=1, max=256,
                             tooltip="Frames per window (official 32; the model was trained on 16 and 32)."),
                io.Int.Input("context_overlap", default=8, min=0, max=255,
                             tooltip="Frames shared by neighbouring windows (official 8; the official README "
                                     "suggests 16 when the appearance drifts)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The MODEL with context windows; the input "
                                                                   "is unchanged.")],
        )

    @classmethod
    def execute(cls, model, context_length: int, context_overlap: int) -> io.NodeOutput:
        if context_overlap >= context_length:
            raise UniAnimateInputError(f"UniAnimateContextWindows: context_overlap ({context_overlap}) must be smaller "
                                       f"than context_length ({context_length}).")
        model = model.clone()
        # static_standard at every step = the official windows (its scheduler is called with step 0);
        # flat fusion = its uniform average; no causal anchor frame (official windows have none)
        model.model_options["context_handler"] = cw.IndexListContextHandler(
            context_schedule=cw.get_matching_context_schedule(cw.ContextSchedules.STATIC_STANDARD),
            fuse_method=cw.get_matching_fuse_method(cw.ContextFuseMethods.FLAT),
            context_length=context_length, context_overlap=context_overlap, dim=FRAME_DIM,
            causal_window_fix=False)
        cw.create_prepare_sampling_wrapper(model)
        return io.NodeOutput(model)
