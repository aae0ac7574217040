"""ApplyFaceAdapter: patch a MODEL's 16 cross-attention layers with the identity."""
from __future__ import annotations

import torch
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..adapter.errors import IDAnimatorError
from ..adapter.face_attention import project_face_tokens
from ..adapter.identity import FaceEmbeds, require_adapter
from ..adapter.layer_map import LAYERS, TEXT_CONTEXT_DIM
from ..adapter.lora import attn2_lora_pairs
from .attention_patch import FaceAttentionPatch
from .unianimate_model import UniAnimateModel
from .types import FACE_EMBEDS, ID_ANIMATOR, IDAnimator

# model_options key: fingerprints of the adapters whose LoRA this model already carries (the
# fingerprint, not the file name: one adapter under two names must not merge twice)
LORA_MARK = "id_animator_lora"


def check_sd15(model) -> None:
    """Refuse models whose cross-attention is not SD1.5-shaped before anything is patched."""
    if isinstance(model.model, UniAnimateModel):
        raise IDAnimatorError(
            "ApplyFaceAdapter cannot patch a UniAnimate MODEL: its cross-attention is 1024 wide (OpenCLIP "
            "ViT-H text and image tokens) and the ID-Animator face adapter was trained for SD1.5's 768; no "
            "face adapter has been trained for UniAnimate yet. UniAnimate keeps the person from the "
            "reference photo by itself: give that photo to UniAnimateConditioning, and score the result "
            "with FaceSimilarity.")
    state = model.model.state_dict()
    wrong = []
    for layer in LAYERS:
        keys = layer.weight_keys
        expected = {"to_q": (layer.channels, layer.channels), "to_k": (layer.channels, TEXT_CONTEXT_DIM),
                    "to_v": (layer.channels, TEXT_CONTEXT_DIM), "to_out": (layer.channels, layer.channels)}
        for name, shape in expected.items():
            tensor = state.get(keys[name])
            if tensor is None or tuple(tensor.shape) != shape:
                wrong.append(f"{keys[name]}: {'missing' if tensor is None else tuple(tensor.shape)} (expected {shape})")
    if wrong:
        kind = type(model.model).__name__
        raise IDAnimatorError(
            f"ApplyFaceAdapter needs an SD1.5 model (cross-attention context 768, widths 320/640/1280); "
            f"this MODEL ({kind}) does not match in {len(wrong)} places, e.g. {'; '.join(wrong[:3])}. "
            "ID-Animator exists for SD1.5 only: load an SD1.5 checkpoint (SDXL, SD2 and Flux will not work).")


def sigma_range(model, start_at: float, end_at: float) -> tuple[float, float]:
    sampling = model.get_model_object("model_sampling")
    return float(sampling.percent_to_sigma(start_at)), float(sampling.percent_to_sigma(end_at))


class ApplyFaceAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyFaceAdapter",
            display_name="Apply Face Adapter (ID-Animator)",
            category="id_animator",
            description="Clones the MODEL and patches its 16 cross-attention layers with the identity and "
                        "the adapter's LoRA. Works with AnimateDiff, context windows, ControlNets and other "
                        "attention patches (IPAdapter, a second ApplyFaceAdapter).",
            search_aliases=["id animator", "face adapter", "identity", "apply identity"],
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5 model (with or without AnimateDiff applied)."),
                ID_ANIMATOR.Input("id_animator", tooltip="From Load ID-Animator."),
                FACE_EMBEDS.Input("face_embeds", tooltip="From FaceEncode or IDMix."),
                io.Float.Input("weight", default=0.8, min=0.0, max=2.0, step=0.01,
                               tooltip="Strength of the face branch (the official λ; 0.8 in infer.py, 1.0 in "
                                       "the demo). 0 = no identity; above ~1.2 faces get over-baked."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the sampling schedule where the face branch starts (0 = first step)."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the face branch stops (1 = last step). "
                                       "The LoRA stays merged for the whole run."),
                io.Float.Input("lora_strength", default=1.0, min=-2.0, max=2.0, step=0.01, advanced=True,
                               tooltip="Strength of the adapter's attn2 LoRA, merged into the weights (1.0 = "
                                       "official; 0 = face branch only). Applied once per adapter even when "
                                       "several ApplyFaceAdapter nodes are chained."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Where the face may appear (1 = face branch on, 0 = off); resized to each "
                                      "layer's grid. Several masks = one per frame."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The patched clone; the input MODEL is unchanged.")],
        )

    @classmethod
    def execute(cls, model, id_animator: IDAnimator, face_embeds: FaceEmbeds, weight: float, start_at: float,
                end_at: float, lora_strength: float, attn_mask: torch.Tensor | None = None) -> io.NodeOutput:
        require_adapter(face_embeds, id_animator.source)
        check_sd15(model)
        if start_at > end_at:
            raise IDAnimatorError(f"ApplyFaceAdapter: start_at ({start_at}) is after end_at ({end_at}).")
        patched = model.clone()
        applied = set(patched.model_options.get(LORA_MARK, ()))
        if lora_strength != 0.0 and id_animator.source.fingerprint not in applied:
            pairs = attn2_lora_pairs(id_animator.weights.layers)
            patches = {key: LoRAAdapter(set(), (pair.up, pair.down, None, None, None, None))
                       for key, pair in pairs.items()}
            patched.add_patches(patches, strength_patch=lora_strength)
            patched.model_options[LORA_MARK] = tuple(sorted(applied | {id_animator.source.fingerprint}))
        sigma_start, sigma_end = sigma_range(model, start_at, end_at)
        mask = None if attn_mask is None else (attn_mask[None] if attn_mask.dim() == 2 else attn_mask).float()
        uncond = face_embeds.uncond_tokens[None].float()
        existing = patched.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})
        for layer in LAYERS:
            tensors = id_animator.weights.layers[layer.official_index]
            to_k, to_v = tensors["to_k_face.weight"].float(), tensors["to_v_face.weight"].float()
            face_keys, face_values = project_face_tokens(face_embeds.face_tokens.float(), to_k, to_v)
            uncond_keys, uncond_values = project_face_tokens(uncond, to_k, to_v)
            # ComfyUI looks up (block, number, 0) before (block, number): wrap whichever is in use.
            block, number = layer.patch_key
            indexed = (block, number, 0)
            key = indexed if indexed in existing else layer.patch_key
            patch = FaceAttentionPatch(
                layer=layer, face_keys=face_keys, face_values=face_values, uncond_keys=uncond_keys,
                uncond_values=uncond_values, embeds=face_embeds, weight=weight, sigma_start=sigma_start,
                sigma_end=sigma_end, mask=mask, previous=existing.get(key))
            patched.set_model_attn2_replace(patch, block, number, 0 if key == indexed else None)
        return io.NodeOutput(patched)
