"""IDMix: blend two identities, or morph from one blend to another across the video's frames."""
from __future__ import annotations

from comfy_api.latest import io

from ..adapter import identity
from ..adapter.identity import FaceEmbeds
from .types import FACE_EMBEDS


class IDMix(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="IDMix",
            display_name="ID Mix (ID-Animator)",
            category="id_animator",
            description="Mixes two identities with a blend slider (0 = A, 1 = B), optionally morphing to "
                        "another blend by the last frame. Chain IDMix nodes for three or more identities.",
            search_aliases=["identity mix", "face blend", "morph faces"],
            inputs=[
                FACE_EMBEDS.Input("embeds_a", tooltip="Identity A (from FaceEncode or another IDMix)."),
                FACE_EMBEDS.Input("embeds_b", tooltip="Identity B (from FaceEncode or another IDMix)."),
                io.Float.Input("blend", default=0.5, min=0.0, max=1.0, step=0.01, display_mode=io.NumberDisplay.slider,
                               tooltip="Share of identity B: 0 = only A, 1 = only B, 0.5 = an even mix. "
                                       "With blend_end set, this is the blend at the first frame."),
                io.Float.Input("blend_end", default=-1.0, min=-1.0, max=1.0, step=0.01, advanced=True,
                               tooltip="-1 = same as blend (no morph). Otherwise the blend moves linearly from "
                                       "`blend` at the first frame to this value at the last frame of the video."),
            ],
            outputs=[FACE_EMBEDS.Output(display_name="face_embeds", tooltip="The mixed identity.")],
        )

    @classmethod
    def execute(cls, embeds_a: FaceEmbeds, embeds_b: FaceEmbeds, blend: float, blend_end: float) -> io.NodeOutput:
        end = None if blend_end < 0 else blend_end
        return io.NodeOutput(identity.blend(embeds_a, embeds_b, blend, end))
