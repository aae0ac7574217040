"""Identities as face tokens, and how they mix across a video: the FACE_EMBEDS payload.

Official §9: several photos of one person are averaged with equal weights after the Resampler.
Blending two people, and morphing the blend over the frames, generalise that mean: the weights
are convex, so blend 0 is exactly identity A and blend 1 exactly identity B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .errors import IDAnimatorError
from .face_attention import mix_face_kv


@dataclass(frozen=True)
class Identity:
    """Leaf of a schedule: all weight on identity `index` of FaceEmbeds.face_tokens."""

    index: int


@dataclass(frozen=True)
class Blend:
    """(1-w)·a + w·b; b's weight w goes linearly from `start` (first frame) to `end` (last)."""

    a: "Schedule"
    b: "Schedule"
    start: float
    end: float


Schedule = Union[Identity, Blend]


def _schedule_weights(schedule: Schedule, t: Tensor, identities: int) -> Tensor:
    """Per-time identity weights (T, K) of a schedule; each row sums to 1."""
    if isinstance(schedule, Identity):
        weights = torch.zeros(t.shape[0], identities, dtype=t.dtype, device=t.device)
        weights[:, schedule.index] = 1.0
        return weights
    # lerp is exact at both ends, so t=0 gives `start` and t=1 gives `end` bit for bit.
    w = torch.lerp(torch.full_like(t, schedule.start), torch.full_like(t, schedule.end), t)
    w = w[:, None]  # (T,) -> (T, 1)
    return ((1 - w) * _schedule_weights(schedule.a, t, identities)
            + w * _schedule_weights(schedule.b, t, identities))


def _shift(schedule: Schedule, offset: int) -> Schedule:
    """The same schedule with every identity index moved by `offset`."""
    if isinstance(schedule, Identity):
        return Identity(schedule.index + offset)
    return Blend(_shift(schedule.a, offset), _shift(schedule.b, offset), schedule.start,
                 schedule.end)


def _is_static(schedule: Schedule) -> bool:
    if isinstance(schedule, Identity):
        return True
    return schedule.start == schedule.end and _is_static(schedule.a) and _is_static(schedule.b)


def _indices(schedule: Schedule) -> list[int]:
    if isinstance(schedule, Identity):
        return [schedule.index]
    return _indices(schedule.a) + _indices(schedule.b)


@dataclass(frozen=True, eq=False)
class FaceEmbeds:
    """FACE_EMBEDS: distinct identities' tokens (K,16,768), uncond tokens (16,768), a schedule."""

    face_tokens: Tensor
    uncond_tokens: Tensor
    schedule: Schedule = Identity(0)

    def __post_init__(self) -> None:
        if self.face_tokens.ndim != 3 or self.face_tokens.shape[0] < 1:
            raise IDAnimatorError(
                f"Face tokens must be (identities, tokens, width), got "
                f"{tuple(self.face_tokens.shape)}.")
        if self.uncond_tokens.shape != self.face_tokens.shape[1:]:
            raise IDAnimatorError(
                f"Unconditional tokens {tuple(self.uncond_tokens.shape)} do not match face "
                f"tokens {tuple(self.face_tokens.shape[1:])}; were they made by another adapter?")
        bad = [i for i in _indices(self.schedule) if not 0 <= i < self.face_tokens.shape[0]]
        if bad:
            raise IDAnimatorError(
                f"Identity schedule refers to identities {bad} but only "
                f"{self.face_tokens.shape[0]} are present.")

    @property
    def identities(self) -> int:
        return self.face_tokens.shape[0]

    @property
    def is_static(self) -> bool:
        """True when every frame gets the same identity mix (no morph)."""
        return _is_static(self.schedule)

    def weights_at(self, t: Tensor) -> Tensor:
        """Identity weights (T, K) at video positions t (T,) in [0, 1]; rows sum to 1."""
        return _schedule_weights(self.schedule, t.to(torch.float32), self.identities)

    def frame_weights(self, frame_indices: Sequence[int], total_frames: int) -> Tensor:
        """Weights (F, K) of the given frames of a `total_frames` video (t = i / (total-1))."""
        if total_frames < 1:
            raise IDAnimatorError(f"A video needs at least one frame, got {total_frames}.")
        # Indices past the end (e.g. a context window padding the video) get the last frame's mix.
        frames = torch.tensor(list(frame_indices), dtype=torch.float32)
        frames = frames.clamp(0, total_frames - 1)
        t = frames / (total_frames - 1) if total_frames > 1 else torch.zeros_like(frames)
        return self.weights_at(t)

    def tokens_for_frames(self, frame_indices: Sequence[int], total_frames: int) -> Tensor:
        """Face tokens (F, 16, 768) of the given frames, mixed per frame by the schedule."""
        weights = self.frame_weights(frame_indices, total_frames)
        return mix_face_kv(self.face_tokens, weights.to(self.face_tokens.device))


def average_photos(tokens: Tensor) -> Tensor:
    """Equal-weight mean of N photos' tokens (N,16,768) -> (16,768), after the Resampler (§9)."""
    if tokens.ndim != 3 or tokens.shape[0] < 1:
        raise IDAnimatorError(
            f"Expected the tokens of N >= 1 photos as (N, 16, 768), got {tuple(tokens.shape)}.")
    return tokens.mean(dim=0)


def single_identity(tokens: Tensor, uncond_tokens: Tensor) -> FaceEmbeds:
    """One person from N photos' tokens (N,16,768) (or one photo's (16,768)): their mean."""
    if tokens.ndim == 2:
        tokens = tokens[None]
    return FaceEmbeds(average_photos(tokens)[None], uncond_tokens, Identity(0))


def _check_blend_value(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise IDAnimatorError(f"Blend {name} must lie in [0, 1] (0 = A, 1 = B), got {value}.")


def blend(a: FaceEmbeds, b: FaceEmbeds, start: float, end: float | None = None) -> FaceEmbeds:
    """Mix A and B: B's weight is `start` at the first frame and `end` (default: start) at the last.

    Chains for 3+ identities (blend(blend(a, b, x), c, y)); uncond tokens are A's.
    """
    end = start if end is None else end
    _check_blend_value("start", start)
    _check_blend_value("end", end)
    if a.face_tokens.shape[1:] != b.face_tokens.shape[1:]:
        raise IDAnimatorError(
            f"Cannot blend face embeds of shapes {tuple(a.face_tokens.shape[1:])} and "
            f"{tuple(b.face_tokens.shape[1:])}; encode both with the same ID-Animator model.")
    face_tokens = torch.cat((a.face_tokens, b.face_tokens.to(a.face_tokens)), dim=0)
    schedule = Blend(a.schedule, _shift(b.schedule, a.identities), float(start), float(end))
    return FaceEmbeds(face_tokens, a.uncond_tokens, schedule)


def weighted_blend(embeds: Sequence[FaceEmbeds], weights: Sequence[float]) -> FaceEmbeds:
    """Static mix of several identities with non-negative weights (normalised to sum 1)."""
    if len(embeds) != len(weights) or not embeds:
        raise IDAnimatorError(
            f"Need one weight per face embeds, got {len(embeds)} embeds, {len(weights)} weights.")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise IDAnimatorError(f"Weights must be >= 0 with a positive sum, got {list(weights)}.")
    # Fold left: after step i the running mix holds weights[:i+1], so the newcomer's share of
    # that prefix is weights[i] / sum(weights[:i+1]).
    mixed, total = embeds[0], float(weights[0])
    for embed, weight in zip(embeds[1:], weights[1:]):
        total += float(weight)
        share = float(weight) / total if total > 0 else 0.0
        mixed = blend(mixed, embed, share)
    return mixed
