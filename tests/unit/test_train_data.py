"""The training set of random reference training: random windows, null text, reference draws
(the paper's, and with the window exclusion, at the real stride 4 and clip length 16), determinism.

The latent cache, face pool and captions are written to disk in the formats of the plan (the
latents, pool and captions commands' outputs) and read back with their real loaders. Every pool
crop is filled with a colour that encodes its frame, so a drawn reference can be traced; in the
window tests each stored frame's latent mean is its own index, so a drawn window can be traced.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from id_animator.adapter.errors import TrainingError
from id_animator.train.captions import load_captions
from id_animator.train.data import Skipped, StepBatches, TrainingSet, collate, epoch_order
from id_animator.train.face_pool import load_pool
from id_animator.train.latents import DEFAULT_STRIDE, LatentCache, stored_frames
from support import train_data
from support.train_data import gaussian_moments, write_captions, write_latent_cache

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES, SIDE, SCALE = 4, 8, 0.18215


def write_cache(folder: Path, videos: list[tuple[str, list[int]]], *, mean: float | None = None,
                std: float | None = None, seed: int = 0, frames: int = FRAMES, side: int = SIDE,
                stride: int = 1) -> Path:
    """LATENTS of videos' stored frames as 8x8 latents, random unless mean and std are given."""
    return write_latent_cache(folder, videos, gaussian_moments(seed, mean=mean, std=std), frames=frames, side=side,
                              checkpoint="tiny.safetensors", scaling_factor=SCALE, stride=stride)


def crop_colour(frame: int) -> tuple[int, int, int]:
    return (frame % 256, (frame * 7) % 256, 200)


def write_pool(folder: Path, faces: dict[str, list[int]], dropped: tuple[str, ...] = ()) -> Path:
    """POOL of 224x224 crops filled with their frame's colour."""
    return train_data.write_pool(folder, faces, lambda _, frame: Image.new("RGB", (224, 224), crop_colour(frame)),
                                 dropped)


def training_set(tmp: Path, videos, pool, captions, **kwargs) -> TrainingSet:
    cache_args = {k: kwargs.pop(k) for k in ("mean", "std", "frames", "side", "stride") if k in kwargs}
    cache = LatentCache(write_cache(tmp / "latents", videos, **cache_args))
    return TrainingSet(cache, load_pool(write_pool(tmp / "pool", pool)),
                       load_captions(write_captions(tmp / "captions.jsonl", captions)), **kwargs)


CLIP, STRIDE = 16, DEFAULT_STRIDE  # the paper's clip length, AnimateDiff's sample_stride


def uniform(counts: dict[int, int], draws: int) -> float:
    """Pearson's chi-squared statistic of `counts` against a uniform draw."""
    expected = draws / len(counts)
    return sum((n - expected) ** 2 / expected for n in counts.values())


@pytest.fixture
def long_video(tmp_path: Path) -> tuple[Path, list[int]]:
    """A 240-frame video at stride 4 (60 stored frames); its pool: frames 2, 50, 117, 180, 233."""
    return tmp_path, [2, 50, 117, 180, 233]


def test_paper_draw_takes_any_pool_face_also_inside_the_window(long_video):
    tmp, faces = long_video
    dataset = training_set(tmp, [("v", stored_frames(240, STRIDE))], {"v": faces}, {"v": "a woman smiles"},
                           seed=7, frames=CLIP, stride=STRIDE, side=1)
    draws, inside = 3000, 0
    counts = dict.fromkeys(faces, 0)
    for epoch in range(draws):
        chosen = dataset.choices(epoch, 0)
        assert chosen.frames == tuple(range(chosen.frames[0], chosen.frames[0] + CLIP * STRIDE, STRIDE))
        counts[chosen.reference.frame] += 1
        inside += chosen.frames[0] <= chosen.reference.frame <= chosen.frames[-1]
    assert uniform(counts, draws) < 23.5, f"reference draws not uniform over the pool: {counts} (df 4, p = 1e-4)"
    assert inside > 0, "the paper's draw never took a face inside the clip's window"
    # The drawn item carries that very crop.
    for epoch in range(5):
        item = dataset.draw(epoch, 0)
        colour = torch.tensor(crop_colour(item["reference_frame"]), dtype=torch.uint8).view(3, 1, 1)
        assert item["reference"].shape == (3, 224, 224)
        assert torch.equal(item["reference"], colour.expand(3, 224, 224))


@pytest.mark.parametrize("margin", [0, 8])
def test_window_exclusion_never_draws_inside_the_span_and_is_uniform_over_the_rest(long_video, margin: int):
    tmp, faces = long_video
    dataset = training_set(tmp, [("v", stored_frames(240, STRIDE))], {"v": faces}, {"v": "x"}, seed=7,
                           frames=CLIP, stride=STRIDE, side=1, reference_exclude_window=margin)
    per_start: dict[int, dict[int, int]] = {}
    for epoch in range(6000):
        chosen = dataset.choices(epoch, 0)
        low, high = chosen.frames[0] - margin, chosen.frames[-1] + margin
        assert not low <= chosen.reference.frame <= high, f"frame {chosen.reference.frame} in [{low}, {high}]"
        per_start.setdefault(chosen.start, {}).setdefault(chosen.reference.frame, 0)
        per_start[chosen.start][chosen.reference.frame] += 1
    assert len(per_start) == 60 - CLIP + 1, "some window starts are never drawn"
    start = max(per_start, key=lambda s: sum(per_start[s].values()))
    eligible = [f for f in faces if not start * STRIDE - margin <= f <= start * STRIDE + (CLIP - 1) * STRIDE + margin]
    assert sorted(per_start[start]) == eligible  # every eligible face is drawn ...
    assert uniform(per_start[start], sum(per_start[start].values())) < 23.5  # ... uniformly


def test_share_of_draws_inside_the_clip_window(tmp_path: Path):
    """Simulated with default clips (16 frames at stride 4) and 5-face pools drawn as the pool command
    draws them (5 distinct random frames): the share of draws whose reference frame lies inside the
    drawn clip's span, for the paper's draw and with the exclusion (margin 0 and 8)."""
    rng = torch.Generator().manual_seed(0)
    report = {}
    for total in (75, 150, 240):
        videos = [(f"v{n}", stored_frames(total, STRIDE)) for n in range(40)]
        faces = {vid: sorted(torch.randperm(total, generator=rng)[:5].tolist()) for vid, _ in videos}
        cache = LatentCache(write_cache(tmp_path / f"latents-{total}", videos, frames=CLIP, stride=STRIDE, side=1))
        pool = load_pool(train_data.write_pool(tmp_path / f"pool-{total}", faces,
                                               lambda _, frame: Image.new("RGB", (224, 224))))
        for margin in (None, 0, 8):
            dataset = TrainingSet(cache, pool, {vid: "x" for vid, _ in videos}, seed=1,
                                  reference_exclude_window=margin)
            inside = draws = 0
            for index in range(len(dataset)):
                for epoch in range(50):
                    chosen = dataset.choices(epoch, index)
                    inside += chosen.frames[0] <= chosen.reference.frame <= chosen.frames[-1]
                    draws += 1
            report[total, margin] = (inside / draws, dataset.skipped.no_reference)
            if margin is not None:
                assert inside == 0
    print("share of reference draws inside the clip's span (16 frames, stride 4, 5-face pools, 40 videos): " +
          "; ".join(f"{total} frames {'paper' if m is None else f'exclude ±{m}'}: {share:.0%}"
                    f"{f' ({skip} of 40 videos skipped)' if skip else ''}" for (total, m), (share, skip) in report.items()))
    # The span covers 61 frames: most of a 75-frame video, a quarter of a 240-frame one.
    assert report[75, None][0] > 0.6 and 0.15 < report[240, None][0] < 0.45
    assert report[75, None][0] > report[150, None][0] > report[240, None][0]


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
    dataset = training_set(tmp_path, [("v", [0, 1, 2, 3])], {"v": [5]}, {"v": "x"}, seed=1, null_image_rate=0.5,
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


def test_random_windows_read_the_drawn_stored_frames(tmp_path: Path):
    """Each stored frame's latent mean is its index (std 0): a drawn item's latents are exactly the
    window `choices` names, windows cover every start uniformly, and items per video = the
    non-overlapping windows it holds."""
    stored = stored_frames(50, 4)  # 13 stored frames: 10 starts of a 4-frame window, 3 items

    def by_index(shape):
        return torch.arange(shape[0], dtype=torch.float32).view(-1, 1, 1, 1).expand(shape).clone(), torch.zeros(shape)

    cache = LatentCache(write_latent_cache(tmp_path / "latents", [("v", stored), ("w", stored_frames(20, 4))],
                                           by_index, frames=FRAMES, side=2, checkpoint="t", stride=4,
                                           scaling_factor=SCALE))
    dataset = TrainingSet(cache, load_pool(write_pool(tmp_path / "pool", {"v": [1, 30], "w": [3]})),
                          load_captions(write_captions(tmp_path / "c.jsonl", {"v": "a", "w": "b"})), seed=2)
    assert len(dataset) == 3 + 1  # 13 // 4 items of v, 5 // 4 of w
    starts = {}
    for epoch in range(60):
        for index in range(3):
            item, chosen = dataset.draw(epoch, index), dataset.choices(epoch, index)
            window = torch.arange(chosen.start, chosen.start + FRAMES, dtype=torch.float32)
            assert torch.allclose(item["latents"][:, 0, 0, 0], window * SCALE, rtol=1e-6, atol=0)
            assert item["frames"] == list(chosen.frames) == stored[chosen.start:chosen.start + FRAMES]
            assert item["clip"] == f"v@{chosen.frames[0]}"
            starts[chosen.start] = starts.get(chosen.start, 0) + 1
    assert sorted(starts) == list(range(10)) and uniform(starts, 180) < 33.7  # df 9, p = 1e-4
    assert {dataset.choices(e, 3).start for e in range(20)} == {0, 1}  # w: 5 stored frames, 2 starts


def test_unusable_videos_skipped_counted_and_logged(tmp_path: Path, caplog):
    videos = [("ok", [0, 1, 2, 3, 4, 5]), ("no_caption", [0, 1, 2, 3]), ("no_pool", [0, 1, 2, 3]),
              ("dropped", [0, 1, 2, 3]), ("inside", [0, 1, 2, 3]), ("short", [0, 1])]
    pool = {"ok": [2, 5], "no_caption": [9], "inside": [0, 3], "dropped": [7], "short": [9]}
    captions = {k: "c" for k in ("ok", "no_pool", "dropped", "inside", "short")}
    cache = LatentCache(write_cache(tmp_path / "latents", videos))
    loaded_pool = load_pool(write_pool(tmp_path / "pool", pool, dropped=("dropped",)))
    loaded_captions = load_captions(write_captions(tmp_path / "c.jsonl", captions))
    with caplog.at_level(logging.INFO, logger="id_animator.train.data"):
        dataset = TrainingSet(cache, loaded_pool, loaded_captions, seed=0, reference_exclude_window=0)
    assert [source.video.video_id for source in dataset.sources] == ["ok"]
    assert dataset.skipped == Skipped(no_caption=1, no_pool=2, no_reference=1, too_short=1)
    assert "Skipped 5 of 6 cached videos" in caplog.text and "no caption" in caplog.text
    assert "no face pool" in caplog.text and "covers every face of their pool" in caplog.text
    assert "fewer stored frames than one 4-frame window" in caplog.text
    # ok: windows at frames 0-3, 1-4, 2-5; face 5 is outside the first two, face 2 inside all three.
    assert dataset.sources[0].starts == (0, 1)
    assert {dataset.choices(e, 0).reference.frame for e in range(20)} == {5}
    # Without the exclusion (the paper's draw) every start and both faces are drawn, and "inside" is kept.
    paper = TrainingSet(cache, loaded_pool, loaded_captions, seed=0)
    assert [source.video.video_id for source in paper.sources] == ["ok", "inside"]
    assert {paper.choices(e, 0).reference.frame for e in range(40)} == {2, 5}
    assert {paper.choices(e, 0).start for e in range(40)} == {0, 1, 2}


def test_empty_training_set_says_why(tmp_path: Path):
    cache = LatentCache(write_cache(tmp_path / "latents", [("a", [0, 1, 2, 3]), ("b", [0, 1, 2, 3])]))
    with pytest.raises(TrainingError, match=r"No training video left of the 2 .*2 because they have no caption"):
        TrainingSet(cache, load_pool(write_pool(tmp_path / "pool", {"a": [3], "b": [4]})),
                    load_captions(write_captions(tmp_path / "c.jsonl", {"other": "x"})), seed=0)
    with pytest.raises(TrainingError, match="null-text rate"):
        TrainingSet(cache, {}, {}, seed=0, null_text_rate=1.5)
    with pytest.raises(TrainingError, match="margin of 0 frames or more"):
        TrainingSet(cache, {}, {}, seed=0, reference_exclude_window=-1)


def test_a_format_1_cache_is_refused_with_what_to_do(tmp_path: Path):
    folder = write_cache(tmp_path / "old", [("a", [0, 1, 2, 3])])
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(TrainingError, match=r"format 1 \(fixed clips\).*latents VIDEOS --checkpoint SD15 --out NEW"):
        LatentCache(folder)
    del meta["format"]  # the writer of format 1 wrote none in tests; the command wrote 1
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match="format 1"):
        LatentCache(folder)
