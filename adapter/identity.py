"""Identities as face tokens, and how they mix across a video: the FACE_EMBEDS payload.

Official §9: several photos of one person are averaged with equal weights after the Resampler.
Blending two people, and morphing the blend over the frames, generalise that mean: the weights
are convex, so blend 0 is exactly identity A and blend 1 exactly identity B.

Face tokens only mean something to the adapter whose Resampler made them (its face K/V were
trained on them), so FaceEmbeds remember that adapter (`AdapterSource`) and refuse to be mixed
with, or applied through, another one.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from .checkpoint import AdapterWeights
from .errors import IDAnimatorError

# The precision weights are compared at. fp32 and fp16 files of one adapter (animator.ckpt and
# its fp16 .safetensors conversion) are the same adapter to a user, and round-to-nearest is
# idempotent, so fp32 -> fp16 and fp16 -> fp16 give the same bytes. A bf16 copy rounds away
# three more mantissa bits and no canonical precision makes it agree with fp32 bit for bit
# (double rounding), so it counts as a different, if close, adapter.
FINGERPRINT_DTYPE = torch.float16
FINGERPRINT_VERSION = b"id-animator adapter fingerprint v1"
SHORT_FINGERPRINT = 12  # hex digits shown in messages


def adapter_fingerprint(weights: AdapterWeights) -> str:
    """sha256 (hex) over every tensor's official name, shape and bytes at fp16, in a fixed order.

    Independent of the file's container, key prefix, name and dtype (fp32/fp16); any changed
    weight changes it. One pass over the 61.8 M parameters, one tensor at a time."""
    digest = hashlib.sha256(FINGERPRINT_VERSION)
    named = [(f"image_proj.{key}", tensor) for key, tensor in sorted(weights.resampler.items())]
    named += [(f"face_adapter.{index}.{key}", tensor) for index in sorted(weights.layers)
              for key, tensor in sorted(weights.layers[index].items())]
    for name, tensor in named:
        canonical = tensor.detach().to(device="cpu", dtype=FINGERPRINT_DTYPE).contiguous()
        # lengths first, so no name/shape/data split of the stream can be read two ways
        header = f"{name}\0{tuple(canonical.shape)}\0{canonical.numel()}\0".encode()
        digest.update(len(header).to_bytes(8, "little") + header)
        digest.update(canonical.view(torch.int16).numpy().astype("<i2", copy=False).data)  # no copy on little-endian
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterSource:
    """Which adapter made some face tokens: its weights' fingerprint, and a name for messages.

    Equal when the fingerprints are, whatever the names: the same file loaded twice, or copied
    under another name, is one adapter."""

    fingerprint: str  # adapter_fingerprint of the weights
    name: str = field(default="", compare=False)  # the file name, for people

    @classmethod
    def of(cls, weights: AdapterWeights, name: str) -> "AdapterSource":
        return cls(adapter_fingerprint(weights), name)

    def __str__(self) -> str:
        return f"'{self.name or 'unnamed adapter'}' (fingerprint {self.fingerprint[:SHORT_FINGERPRINT]})"


def _both_named(first: AdapterSource, second: AdapterSource) -> tuple[str, str]:
    """Both descriptions; full fingerprints where the short ones happen to agree."""
    one, other = str(first), str(second)
    if one == other:
        one = f"'{first.name}' (fingerprint {first.fingerprint})"
        other = f"'{second.name}' (fingerprint {second.fingerprint})"
    return one, other


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
    """FACE_EMBEDS: distinct identities' tokens (K,16,768), uncond tokens (16,768), a schedule,
    and the adapter that made them.

    `adapter` is None only for embeds built directly in code (tests, scripts) or mixed from such
    embeds: nothing is known about their adapter, so they are not checked. FaceEncode always
    records its adapter."""

    face_tokens: Tensor
    uncond_tokens: Tensor
    schedule: Schedule = Identity(0)
    adapter: Optional[AdapterSource] = None

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


def average_photos(tokens: Tensor) -> Tensor:
    """Equal-weight mean of N photos' tokens (N,16,768) -> (16,768), after the Resampler (§9)."""
    if tokens.ndim != 3 or tokens.shape[0] < 1:
        raise IDAnimatorError(
            f"Expected the tokens of N >= 1 photos as (N, 16, 768), got {tuple(tokens.shape)}.")
    return tokens.mean(dim=0)


def single_identity(tokens: Tensor, uncond_tokens: Tensor,
                    adapter: AdapterSource | None = None) -> FaceEmbeds:
    """One person from N photos' tokens (N,16,768) (or one photo's (16,768)): their mean."""
    if tokens.ndim == 2:
        tokens = tokens[None]
    return FaceEmbeds(average_photos(tokens)[None], uncond_tokens, Identity(0), adapter)


def require_adapter(embeds: FaceEmbeds, adapter: AdapterSource, where: str = "ApplyFaceAdapter") -> None:
    """Refuse embeds another adapter made: its tokens mean nothing to `adapter`'s face K/V."""
    if embeds.adapter is None or embeds.adapter == adapter:
        return
    made_by, given = _both_named(embeds.adapter, adapter)
    raise IDAnimatorError(
        f"{where}: these face embeds were made by adapter {made_by}, but the ID-Animator given "
        f"here holds adapter {given}. Identity tokens only mean something to the adapter whose "
        "Resampler made them. Encode the photos with the same Load ID-Animator that feeds "
        f"{where} (connect its id_animator output to FaceEncode too).")


def _mixed_adapter(a: FaceEmbeds, b: FaceEmbeds) -> AdapterSource | None:
    """The adapter of a mix of a and b; refuses two different adapters."""
    if a.adapter is None or b.adapter is None:
        return None  # part of the mix is of unknown origin, so the mix is too
    if a.adapter != b.adapter:
        first, second = _both_named(a.adapter, b.adapter)
        raise IDAnimatorError(
            f"Cannot mix face embeds made by different adapters: identity A was made by adapter "
            f"{first}, identity B by adapter {second}. Identity tokens only mean something to "
            "the adapter that made them. Encode every photo with the same Load ID-Animator, the "
            "one that feeds ApplyFaceAdapter.")
    return a.adapter


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
    adapter = _mixed_adapter(a, b)
    if a.face_tokens.shape[1:] != b.face_tokens.shape[1:]:
        raise IDAnimatorError(
            f"Cannot blend face embeds of shapes {tuple(a.face_tokens.shape[1:])} and "
            f"{tuple(b.face_tokens.shape[1:])}; encode both with the same ID-Animator model.")
    face_tokens = torch.cat((a.face_tokens, b.face_tokens.to(a.face_tokens)), dim=0)
    schedule = Blend(a.schedule, _shift(b.schedule, a.identities), float(start), float(end))
    return FaceEmbeds(face_tokens, a.uncond_tokens, schedule, adapter)
