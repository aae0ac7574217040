"""The training set of random reference training: null text, reference draws, determinism.

The latent cache, face pool and captions are written to disk in the formats of the plan (the
latents, pool and captions commands' outputs) and read back with their real loaders. Every pool
crop is filled with a colour that encodes its frame, so a drawn reference can be traced.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from id_animator.adapter.errors import TrainingError
from id_animator.train.captions import load_captions
from id_animator.train.data import StepBatches, TrainingSet, collate, epoch_order
from id_animator.train.face_pool import load_pool
from id_animator.train.latents import LatentCache
from support import train_data
from support.train_data import gaussian_moments, write_captions, write_latent_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, SIDE, SCALE = 4, 8, 0.18215


def write_cache(folder: Path, clips: list[tuple[str, list[int]]], *, mean: float | None = None,
                std: float | None = None, seed: int = 0) -> Path:
    """LATENTS of clips of 8x8 latents, random unless mean and std are given."""
    return write_latent_cache(folder, clips, gaussian_moments(seed, mean=mean, std=std), frames=FRAMES, side=SIDE,
                              checkpoint="tiny.safetensors", scaling_factor=SCALE)


def crop_colour(frame: int) -> tuple[int, int, int]:
    return (frame % 256, (frame * 7) % 256, 200)


def write_pool(folder: Path, faces: dict[str, list[int]], dropped: tuple[str, ...] = ()) -> Path:
    """POOL of 224x224 crops filled with their frame's colour."""
    return train_data.write_pool(folder, faces, lambda _, frame: Image.new("RGB", (224, 224), crop_colour(frame)),
                                 dropped)


def training_set(tmp: Path, clips, pool, captions, **kwargs) -> TrainingSet:
    cache = LatentCache(write_cache(tmp / "latents", clips, **{k: kwargs.pop(k) for k in ("mean", "std") if k in kwargs}))
    return TrainingSet(cache, load_pool(write_pool(tmp / "pool", pool)),
                       load_captions(write_captions(tmp / "captions.jsonl", captions)), **kwargs)


@pytest.fixture
def overlapping(tmp_path: Path) -> TrainingSet:
    """One clip on frames 0..3; its video's pool holds frames 1 and 3 (targets) and 9, 12, 20."""
    return training_set(tmp_path, [("v", [0, 1, 2, 3])], {"v": [1, 3, 9, 12, 20]}, {"v": "a woman smiles"},
                        seed=7)


def test_reference_always_from_the_pool_never_a_target_frame_and_uniform(overlapping: TrainingSet):
    draws = 3000
    counts = {9: 0, 12: 0, 20: 0}
    for index in range(draws):
        frame = overlapping.choices(index, 0).reference.frame
        assert frame in counts, f"reference frame {frame} is a target frame or outside the pool"
        counts[frame] += 1
    expected = draws / len(counts)
    chi2 = sum((n - expected) ** 2 / expected for n in counts.values())
    assert chi2 < 18.4, f"reference draws not uniform: {counts}, chi2 {chi2:.1f} (df 2, p = 1e-4 at 18.4)"
    # The drawn item carries that very crop.
    for epoch in range(5):
        item = overlapping.draw(epoch, 0)
        colour = torch.tensor(crop_colour(item["reference_frame"]), dtype=torch.uint8).view(3, 1, 1)
        assert item["reference"].shape == (3, 224, 224)
        assert torch.equal(item["reference"], colour.expand(3, 224, 224))


def test_null_text_rate_and_the_null_caption(tmp_path: Path):
    dataset = training_set(tmp_path, [("v", [0, 1, 2, 3])], {"v": [10, 11]}, {"v": "a man talks"}, seed=3)
    draws = 20000
    dropped = sum(dataset.choices(epoch, 0).drop_text for epoch in range(draws))
    sigma = math.sqrt(0.2 * 0.8 / draws)
    assert abs(dropped / draws - 0.2) < 4 * sigma, f"null-text rate {dropped / draws:.4f}, want 0.2 ± {4 * sigma:.4f}"
    assert not any(dataset.choices(epoch, 0).drop_image for epoch in range(2000)), "image dropped at rate 0"
    captions = {dataset.draw(epoch, 0)["caption"] for epoch in range(40)}
    assert captions == {"", "a man talks"}
    for epoch in range(40):
        item = dataset.draw(epoch, 0)
        assert (item["caption"] == "") == dataset.choices(epoch, 0).drop_text


def test_null_image_rate_when_asked(tmp_path: Path):
    dataset = training_set(tmp_path, [("v", [0])], {"v": [5]}, {"v": "x"}, seed=1, null_image_rate=0.5,
                           null_text_rate=0.0)
    draws = 4000
    dropped = sum(dataset.choices(epoch, 0).drop_image for epoch in range(draws))
    assert abs(dropped / draws - 0.5) < 4 * math.sqrt(0.25 / draws)
    assert not any(dataset.choices(epoch, 0).drop_text for epoch in range(draws))


def test_latents_sampled_from_the_cached_gaussian(tmp_path: Path):
    exact = training_set(tmp_path / "a", [("v", [0, 1, 2, 3])], {"v": [9]}, {"v": "x"}, seed=0, mean=0.5, std=0.0)
    item = exact.draw(0, 0)
    assert item["latents"].shape == (FRAMES, 4, SIDE, SIDE)
    assert torch.equal(item["latents"], torch.full_like(item["latents"], 0.5 * SCALE))
    standard = training_set(tmp_path / "b", [("v", [0, 1, 2, 3])], {"v": [9]}, {"v": "x"}, seed=0, mean=0.0, std=1.0)
    z = torch.stack([standard.draw(epoch, 0)["latents"] for epoch in range(8)]) / SCALE
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05  # 8192 samples: sigma of the mean 0.011
    noise = torch.stack([standard.draw(epoch, 0)["noise"] for epoch in range(8)])
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    assert not torch.equal(noise[0], z[0]), "noise and latent sample share their draw"
    timesteps = torch.stack([standard.draw(epoch, 0)["timestep"] for epoch in range(200)])
    assert timesteps.min() >= 0 and timesteps.max() < 1000 and len(set(timesteps.tolist())) > 150


def test_deterministic_per_seed_epoch_index(tmp_path: Path):
    clips = [("v", [0, 1, 2, 3]), ("w", [4, 5, 6, 7])]
    pool, captions = {"v": [10, 11, 12], "w": [1, 20, 30]}, {"v": "a", "w": "b"}
    first = training_set(tmp_path / "a", clips, pool, captions, seed=5)
    second = training_set(tmp_path / "b", clips, pool, captions, seed=5)
    other_seed = training_set(tmp_path / "c", clips, pool, captions, seed=6)

    def same(a: dict, b: dict) -> bool:
        return all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)

    for epoch, index in [(0, 0), (0, 1), (3, 1)]:
        assert same(first.draw(epoch, index), second.draw(epoch, index))
        assert same(first[(epoch, index)], first.draw(epoch, index))
    assert not same(first.draw(0, 0), first.draw(1, 0))
    assert not same(first.draw(0, 0), other_seed.draw(0, 0))
    # Workers draw what the main process draws.
    sampler = StepBatches(len(first), 1, seed=5)
    loaded = [batch for _, batch in zip(range(4), torch.utils.data.DataLoader(
        first, batch_sampler=sampler, collate_fn=collate, num_workers=2))]
    direct = [collate([first.draw(*key) for key in sampler.keys(step)]) for step in range(4)]
    for a, b in zip(loaded, direct):
        assert same(a, b)


def test_step_batches_resume_ranks_and_epochs():
    size, batch, world = 10, 2, 2
    uninterrupted = StepBatches(size, batch, seed=1)
    resumed = StepBatches(size, batch, seed=1, start=3)
    full = [keys for _, keys in zip(range(6), uninterrupted)]
    assert [keys for _, keys in zip(range(3), resumed)] == full[3:6]
    ranks = [StepBatches(size, batch, seed=1, rank=r, world_size=world) for r in range(world)]
    assert ranks[0].per_epoch == size // (batch * world) == 2
    for step in range(6):
        epoch, position = ranks[0].position(step)
        shares = [rank.keys(step) for rank in ranks]
        assert not set(shares[0]) & set(shares[1])
        order = epoch_order(1, epoch, size)
        assert [i for share in shares for _, i in share] == list(order[position * 4:position * 4 + 4])
        assert all(e == epoch for share in shares for e, _ in share)
    seen = [i for step in range(2) for rank in ranks for _, i in rank.keys(step)]
    assert len(set(seen)) == len(seen) == 8, "a clip drawn twice within an epoch"
    assert epoch_order(1, 0, size) != epoch_order(1, 1, size)
    with pytest.raises(TrainingError, match="fewer than one global batch"):
        StepBatches(3, 2, seed=0, world_size=2)


def test_unusable_clips_skipped_counted_and_logged(tmp_path: Path, caplog):
    clips = [("ok", [0, 1]), ("no_caption", [0, 1]), ("no_pool", [0, 1]), ("dropped", [0, 1]),
             ("inside", [0, 1, 2]), ("ok", [5, 6])]
    pool = {"ok": [3, 5], "no_caption": [9], "inside": [0, 2], "dropped": [7]}
    captions = {k: "c" for k in ("ok", "no_pool", "dropped", "inside")}
    cache = LatentCache(write_cache(tmp_path / "latents", clips))
    with caplog.at_level(logging.INFO, logger="id_animator.train.data"):
        dataset = TrainingSet(cache, load_pool(write_pool(tmp_path / "pool", pool, dropped=("dropped",))),
                              load_captions(write_captions(tmp_path / "c.jsonl", captions)), seed=0)
    assert [clip.name for clip in dataset.clips] == ["ok@0", "ok@5"]
    assert (dataset.skipped.no_caption, dataset.skipped.no_pool, dataset.skipped.no_reference) == (1, 2, 1)
    assert "Skipped 4 of 6 cached clips" in caplog.text and "no caption" in caplog.text
    assert "no face pool" in caplog.text and "among the clip's own frames" in caplog.text
    # ok@5's pool is {3, 5} minus its frame 5: always frame 3.
    assert {dataset.choices(e, 1).reference.frame for e in range(20)} == {3}


def test_empty_training_set_says_why(tmp_path: Path):
    cache = LatentCache(write_cache(tmp_path / "latents", [("a", [0]), ("b", [0])]))
    with pytest.raises(TrainingError, match=r"No training clip left of the 2 .*2 because their video has no caption"):
        TrainingSet(cache, load_pool(write_pool(tmp_path / "pool", {"a": [3], "b": [4]})),
                    load_captions(write_captions(tmp_path / "c.jsonl", {"other": "x"})), seed=0)
    with pytest.raises(TrainingError, match="null-text rate"):
        TrainingSet(cache, {}, {}, seed=0, null_text_rate=1.5)
