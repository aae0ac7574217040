"""The training set of random reference training (paper §3.3.2, §4.1).

One item = one draw from one cached video: a random window of `frames` consecutive stored frames
(every `stride`-th frame of the video, so the clip AnimateDiff's loader would cut from a random
start), a fresh latent sampled from the VAE's cached Gaussian, the noise ε and the timestep t of
its diffusion step, its video's unified caption (or the null text, 20% of draws), and a
reference face drawn uniformly from *its video's* face pool.

The reference draw is the paper's by default: "a reference image from the face pool" (§3.4), any
face of the video's pool, also one whose frame lies inside the drawn window. With
`reference_exclude_window=MARGIN`, faces whose frame lies inside the window's span (first to last
sampled frame, widened by MARGIN frames on each side) are not eligible: frames 1-3 away from a
target frame share its pose, light and background, so dropping only the 16 target frames would
not keep the reference apart from the clip. The window is then drawn among the starts that leave
at least one eligible face; a video where none does is skipped and counted.

A video gives `max(1, stored frames // frames)` items per epoch (the non-overlapping clips it
holds), each with its own random window: an epoch weighs videos by their length, and overlap
between windows costs no extra encoding (the cache holds each frame once).

Every random choice of an item comes from a `torch.Generator` seeded by a hash of
(seed, epoch, index), never from a global RNG: the same item on any rank, in any worker, in a
resumed run or an uninterrupted one. The order of the items in an epoch is a permutation seeded by
(seed, epoch), and `StepBatches` cuts it into the batches of each optimizer micro-step, so a run
resumed at step n draws exactly what an uninterrupted run draws from step n on.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..adapter.errors import TrainingError
from ..adapter.resampler import CLIP_IMAGE_SIZE
from .face_pool import PoolFace
from .latents import CachedVideo, LatentCache

logger = logging.getLogger(__name__)

NULL_TEXT = ""  # the null-text condition of classifier-free guidance is the encoded empty prompt


def draw_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of `parts`: independent streams without a global RNG."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(draw_seed(*parts))


def read_crop(path: Path) -> Tensor:
    """A pool crop as uint8 (3, 224, 224): the aligned face the adapter sees at inference."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
    except OSError as error:
        raise TrainingError(f"Cannot read the pool crop {path}: {error}. Run the pool command "
                            f"again on that video (delete its manifest first) or remove it.") from error
    if pixels.shape[:2] != (CLIP_IMAGE_SIZE, CLIP_IMAGE_SIZE):
        raise TrainingError(f"The pool crop {path} is {pixels.shape[1]}x{pixels.shape[0]}, not "
                            f"{CLIP_IMAGE_SIZE}x{CLIP_IMAGE_SIZE}: it was not written by the pool command.")
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)


@dataclass(frozen=True)
class Skipped:
    """Videos of the latent cache the training set cannot use, by reason."""

    no_caption: int = 0
    no_pool: int = 0
    no_reference: int = 0  # with the window exclusion: every window's span covers every pool face
    too_short: int = 0  # fewer stored frames than one window

    @property
    def total(self) -> int:
        return self.no_caption + self.no_pool + self.no_reference + self.too_short


@dataclass(frozen=True)
class Choices:
    """The discrete draws of one item: null text, null image, window, reference face, timestep."""

    drop_text: bool
    drop_image: bool
    start: int  # the window's first stored frame (an index into the video's stored frames)
    frames: tuple[int, ...]  # the video frames of the window
    reference: PoolFace  # of the window's video
    timestep: int


@dataclass(frozen=True)
class _Source:
    """A usable video: its cache entry, caption, pool, and the window starts it may draw."""

    video: CachedVideo
    caption: str
    faces: tuple[PoolFace, ...]
    starts: tuple[int, ...]


class TrainingSet(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, index); see the module docstring."""

    def __init__(self, cache: LatentCache, pool: Mapping[str, Sequence[PoolFace]],
                 captions: Mapping[str, str], *, seed: int, null_text_rate: float = 0.2,
                 null_image_rate: float = 0.0, num_train_timesteps: int = 1000,
                 reference_exclude_window: int | None = None) -> None:
        for name, rate in (("null-text rate", null_text_rate), ("null-image rate", null_image_rate)):
            if not 0.0 <= rate <= 1.0:
                raise TrainingError(f"The {name} is {rate}; give a probability in [0, 1].")
        if reference_exclude_window is not None and reference_exclude_window < 0:
            raise TrainingError(f"--reference-exclude-window is {reference_exclude_window}; give a margin of "
                                f"0 frames or more.")
        self.cache = cache
        self.seed = seed
        self.frames = cache.window
        self.null_text_rate = null_text_rate
        self.null_image_rate = null_image_rate
        self.num_train_timesteps = num_train_timesteps
        self.exclude_margin = reference_exclude_window
        self.sources: list[_Source] = []
        self.items: list[int] = []  # item -> its source
        reasons: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for video in cache.videos:
            faces = tuple(pool.get(video.video_id) or ())
            starts = tuple(start for start in range(video.windows(self.frames))
                           if self._eligible(video, start, faces))
            reason = ("no_caption" if video.video_id not in captions else "no_pool" if not faces
                      else "too_short" if not video.windows(self.frames) else "no_reference" if not starts
                      else None)
            if reason:
                reasons[reason] += 1
                examples.setdefault(reason, video.video_id)
                continue
            self.items += [len(self.sources)] * max(1, len(video.frames) // self.frames)
            self.sources.append(_Source(video, captions[video.video_id], faces, starts))
        self.skipped = Skipped(**reasons)
        self._report(len(cache.videos), examples)

    def window_span(self, video: CachedVideo, start: int) -> tuple[int, int]:
        """The video frames a reference may not come from with the exclusion: first - margin to
        last + margin of the window (inclusive)."""
        margin = self.exclude_margin or 0
        return video.frames[start] - margin, video.frames[start + self.frames - 1] + margin

    def _eligible(self, video: CachedVideo, start: int, faces: Sequence[PoolFace]) -> tuple[PoolFace, ...]:
        """The pool faces a window at `start` may take as reference."""
        if self.exclude_margin is None:  # the paper's draw: any face of the pool
            return tuple(faces)
        low, high = self.window_span(video, start)
        return tuple(face for face in faces if not low <= face.frame <= high)

    def _report(self, cached: int, examples: dict[str, str]) -> None:
        skipped = self.skipped
        why = {"no_caption": "they have no caption",
               "no_pool": "they have no face pool (not pooled, or dropped by the pool command)",
               "no_reference": f"every window's span (widened by --reference-exclude-window "
                               f"{self.exclude_margin}) covers every face of their pool",
               "too_short": f"they hold fewer stored frames than one {self.frames}-frame window"}
        parts = [f"{getattr(skipped, reason)} because {text} (e.g. {examples[reason]})"
                 for reason, text in why.items() if getattr(skipped, reason)]
        if not self.sources:
            detail = "; ".join(parts) if parts else "the latent cache holds no video"
            raise TrainingError(f"No training video left of the {cached} in the latent cache: {detail}. "
                                f"Run the pool, captions and latents commands on the same videos "
                                f"(they key on the same video ids).")
        if parts:
            logger.warning("Skipped %d of %d cached videos: %s.", skipped.total, cached, "; ".join(parts))
        logger.info("Training set: %d videos, %d items per epoch (windows of %d frames), %d reference faces; "
                    "reference draw: %s.", len(self.sources), len(self.items), self.frames,
                    sum(len(s.faces) for s in self.sources),
                    "any face of the pool (the paper's)" if self.exclude_margin is None else
                    f"faces outside the window's span ± {self.exclude_margin} frames")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.draw(epoch, index)

    def _choose(self, g: torch.Generator, index: int) -> Choices:
        drop_text = bool(torch.rand((), generator=g) < self.null_text_rate)
        drop_image = bool(torch.rand((), generator=g) < self.null_image_rate)
        source = self.sources[self.items[index]]
        start = source.starts[int(torch.randint(len(source.starts), (), generator=g))]
        references = self._eligible(source.video, start, source.faces)
        reference = references[int(torch.randint(len(references), (), generator=g))]
        timestep = int(torch.randint(self.num_train_timesteps, (), generator=g))
        frames = source.video.frames[start:start + self.frames]
        return Choices(drop_text, drop_image, start, frames, reference, timestep)

    def choices(self, epoch: int, index: int) -> Choices:
        """The discrete draws of item `index` in `epoch`, without loading anything."""
        return self._choose(generator(self.seed, epoch, index), index)

    def draw(self, epoch: int, index: int) -> dict[str, Any]:
        """Item `index` as drawn in `epoch`: the same on every rank and every run."""
        g = generator(self.seed, epoch, index)
        chosen = self._choose(g, index)
        source = self.sources[self.items[index]]
        # z = (mean + std·e) * scaling_factor: a fresh sample of the VAE posterior each draw.
        latents = self.cache.sample(source.video, chosen.start, g)
        noise = torch.randn(latents.shape, generator=g)
        return {
            "latents": latents,  # (F, 4, h, w)
            "noise": noise,  # ε, (F, 4, h, w)
            "timestep": torch.tensor(chosen.timestep),  # one t per clip
            "caption": NULL_TEXT if chosen.drop_text else source.caption,
            "reference": read_crop(chosen.reference.crop),  # uint8 (3, 224, 224)
            "drop_image": torch.tensor(chosen.drop_image),
            "reference_frame": chosen.reference.frame,
            "clip": f"{source.video.video_id}@{chosen.frames[0]}",
            "frames": list(chosen.frames),
            "epoch": epoch,
            "index": index,
        }


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, size: int) -> tuple[int, ...]:
    """The clips' order in `epoch`: a permutation seeded by (seed, epoch)."""
    return tuple(torch.randperm(size, generator=generator("order", seed, epoch)).tolist())


class StepBatches(torch.utils.data.Sampler):
    """Batch sampler: for each micro-step from `start`, this rank's (epoch, index) keys.

    Micro-step k reads the global batch k of its epoch (batch_size × world_size consecutive clips
    of the epoch's order) and rank r takes its r-th slice. The incomplete global batch at the end
    of an epoch is dropped, so every rank sees as many batches. Infinite: the loop stops it.
    """

    def __init__(self, size: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 start: int = 0) -> None:
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.per_epoch = size // (batch_size * world_size)
        if self.per_epoch == 0:
            raise TrainingError(f"The training set has {size} clip draws per epoch, fewer than one global batch "
                                f"({batch_size} per process × {world_size} processes); lower "
                                f"--batch-size or add videos.")

    def position(self, micro_step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a micro-step."""
        return divmod(micro_step, self.per_epoch)

    def keys(self, micro_step: int) -> list[tuple[int, int]]:
        epoch, batch = self.position(micro_step)
        order = epoch_order(self.seed, epoch, self.size)
        first = (batch * self.world_size + self.rank) * self.batch_size
        return [(epoch, index) for index in order[first:first + self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_step = self.start
        while True:
            yield self.keys(micro_step)
            micro_step += 1


def collate(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Tensors stacked on a new batch axis, everything else as lists."""
    return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], Tensor)
            else [item[key] for item in items] for key in items[0]}
