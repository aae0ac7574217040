"""The training set of random reference training (paper §3.3.2, §4.1).

One item = one cached clip: a fresh latent sampled from the VAE's cached Gaussian, the noise ε and
the timestep t of its diffusion step, its video's unified caption (or the null text, 20% of draws),
and a reference face drawn uniformly from *its video's* face pool, never from the clip's own
frames (the adapter must learn what stays constant across references: identity, not pose).

Every random choice of an item comes from a `torch.Generator` seeded by a hash of
(seed, epoch, index), never from a global RNG: the same item on any rank, in any worker, in a
resumed run or an uninterrupted one. The order of the clips in an epoch is a permutation seeded by
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
from .latents import Clip, LatentCache

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
    """Clips of the latent cache the training set cannot use, by reason."""

    no_caption: int = 0
    no_pool: int = 0
    no_reference: int = 0  # every pool face of the video lies among the clip's own frames

    @property
    def total(self) -> int:
        return self.no_caption + self.no_pool + self.no_reference


@dataclass(frozen=True)
class Choices:
    """The discrete draws of one item: null text, null image, reference face, timestep."""

    drop_text: bool
    drop_image: bool
    reference: PoolFace  # of the clip's video, outside the clip's frames
    timestep: int


class TrainingSet(torch.utils.data.Dataset):
    """Map-style dataset indexed by (epoch, index); see the module docstring."""

    def __init__(self, cache: LatentCache, pool: Mapping[str, Sequence[PoolFace]],
                 captions: Mapping[str, str], *, seed: int, null_text_rate: float = 0.2,
                 null_image_rate: float = 0.0, num_train_timesteps: int = 1000) -> None:
        for name, rate in (("null-text rate", null_text_rate), ("null-image rate", null_image_rate)):
            if not 0.0 <= rate <= 1.0:
                raise TrainingError(f"The {name} is {rate}; give a probability in [0, 1].")
        self.cache = cache
        self.seed = seed
        self.null_text_rate = null_text_rate
        self.null_image_rate = null_image_rate
        self.num_train_timesteps = num_train_timesteps
        self.clips: list[Clip] = []
        self.captions: list[str] = []
        self.references: list[list[PoolFace]] = []
        reasons: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for clip in cache.clips:
            faces = pool.get(clip.video_id) or []
            targets = set(clip.frames)
            references = [face for face in faces if face.frame not in targets]
            reason = ("no_caption" if clip.video_id not in captions else "no_pool" if not faces
                      else "no_reference" if not references else None)
            if reason:
                reasons[reason] += 1
                examples.setdefault(reason, clip.name)
                continue
            self.clips.append(clip)
            self.captions.append(captions[clip.video_id])
            self.references.append(references)
        self.skipped = Skipped(**reasons)
        self._report(len(cache.clips), examples)

    def _report(self, cached: int, examples: dict[str, str]) -> None:
        skipped = self.skipped
        why = {"no_caption": "their video has no caption",
               "no_pool": "their video has no face pool (not pooled, or dropped by the pool command)",
               "no_reference": "every face of their video's pool lies among the clip's own frames"}
        parts = [f"{getattr(skipped, reason)} because {text} (e.g. {examples[reason]})"
                 for reason, text in why.items() if getattr(skipped, reason)]
        if not self.clips:
            detail = "; ".join(parts) if parts else "the latent cache holds no clip"
            raise TrainingError(f"No training clip left of the {cached} in the latent cache: {detail}. "
                                f"Run the pool, captions and latents commands on the same videos "
                                f"(they key on the same video ids).")
        if parts:
            logger.warning("Skipped %d of %d cached clips: %s.", skipped.total, cached, "; ".join(parts))
        videos = len({clip.video_id for clip in self.clips})
        logger.info("Training set: %d clips of %d videos, %d reference faces.", len(self.clips),
                    videos, sum(len(r) for r in self.references))

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.draw(epoch, index)

    def _choose(self, g: torch.Generator, index: int) -> Choices:
        drop_text = bool(torch.rand((), generator=g) < self.null_text_rate)
        drop_image = bool(torch.rand((), generator=g) < self.null_image_rate)
        references = self.references[index]
        reference = references[int(torch.randint(len(references), (), generator=g))]
        timestep = int(torch.randint(self.num_train_timesteps, (), generator=g))
        return Choices(drop_text, drop_image, reference, timestep)

    def choices(self, epoch: int, index: int) -> Choices:
        """The discrete draws of item `index` in `epoch`, without loading anything."""
        return self._choose(generator(self.seed, epoch, index), index)

    def draw(self, epoch: int, index: int) -> dict[str, Any]:
        """Item `index` as drawn in `epoch`: the same on every rank and every run."""
        g = generator(self.seed, epoch, index)
        chosen = self._choose(g, index)
        # z = (mean + std·e) * scaling_factor: a fresh sample of the VAE posterior each draw.
        latents = self.cache.sample(self.clips[index], g)
        noise = torch.randn(latents.shape, generator=g)
        return {
            "latents": latents,  # (F, 4, h, w)
            "noise": noise,  # ε, (F, 4, h, w)
            "timestep": torch.tensor(chosen.timestep),  # one t per clip
            "caption": NULL_TEXT if chosen.drop_text else self.captions[index],
            "reference": read_crop(chosen.reference.crop),  # uint8 (3, 224, 224)
            "drop_image": torch.tensor(chosen.drop_image),
            "reference_frame": chosen.reference.frame,
            "clip": self.clips[index].name,
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
            raise TrainingError(f"The training set has {size} clips, fewer than one global batch "
                                f"({batch_size} per process × {world_size} processes); lower "
                                f"--batch-size or add clips.")

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
