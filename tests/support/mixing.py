"""The per-frame face tokens a FaceEmbeds schedule gives, as the reference the patch's mixed
face K/V are checked against (the product mixes K/V; mixing tokens first is equal, by linearity)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def mixed_tokens(embeds, frame_indices: Sequence[int], total_frames: int) -> Tensor:
    """Face tokens (F, 16, 768) of the given frames of a `total_frames` video, mixed per frame."""
    from id_animator.adapter.face_attention import mix_identities

    return mix_identities(embeds.face_tokens, embeds.frame_weights(frame_indices, total_frames))
