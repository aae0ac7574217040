"""UniAnimate UNet: the official key layout at full size, and fp32 parity with the official
`UNetSD_UniAnimate` (imported from its repository, support.unianimate_official) at a reduced size,
for every conditioning combination the official forward permits, batched or per sample."""
from __future__ import annotations

import itertools

import pytest
import torch

from id_animator.unianimate.config import UniAnimateConfig
from id_animator.unianimate.errors import UniAnimateInputError
from id_animator.unianimate.unet import UniAnimateUNet
from support.unianimate_official import official_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Reduced size, same structure: every level, attention scale and skip of the official layout.
# context_dim stays 1024: the official decoder hard-codes it.
SMALL = dict(dim=32, head_dim=16, num_heads=2)
H, W, FRAMES = 64, 64, 3  # pose images; latent 8x8 (the smallest with three downsamplings)
TOLERANCE = 1e-5  # max |ours - official| / max |official|


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (the official init zeroes several output layers), fan-in scaled,
    norm scales near 1, so every branch contributes to the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


@pytest.fixture(scope="module")
def zero_y() -> torch.Tensor:
    return torch.randn(1, 77, 1024, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def pair(cache_dir, zero_y) -> tuple[torch.nn.Module, UniAnimateUNet]:
    """(official, ours) with the same random weights, copied official -> ours strictly."""
    official = official_unet(cache_dir, (W, H), zero_y=zero_y, **SMALL)
    randomize_(official, seed=1)
    ours = UniAnimateUNet(UniAnimateConfig(**SMALL)).eval()
    ours.load_state_dict(official.state_dict(), strict=True)
    return official, ours


def inputs(batch: int, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    h, w = H // 8, W // 8
    return {"x": torch.randn(batch, 4, FRAMES, h, w, generator=gen),
            "t": torch.tensor([991.0, 34.0, 1.0][:batch]),
            "dwpose": torch.rand(batch, 3, FRAMES + 1, H, W, generator=gen),
            "randomref": torch.randn(batch, 4, FRAMES, h, w, generator=gen),
            "local_image": torch.rand(batch, 3, FRAMES, H, W, generator=gen),
            "image": torch.randn(batch, 1, 1024, generator=gen)}


OURS = {"dwpose": "pose", "randomref": "reference_latent", "local_image": "local_image", "image": "image_embed"}
# image on/off x dwpose on/off x randomref on/off x local_image on/off; randomref needs dwpose
# (the official forward raises UnboundLocalError without it)
COMBOS = [c for c in itertools.product((False, True), repeat=4) if not (c[2] and not c[1])]


def combo_id(combo: tuple[bool, ...]) -> str:
    return "+".join(n for n, on in zip(("image", "dwpose", "randomref", "local_image"), combo) if on) or "none"


def relative_error(ours: torch.Tensor, official: torch.Tensor) -> float:
    return ((ours - official).abs().max() / official.abs().max()).item()


def run_both(pair, zero_y, data: dict[str, torch.Tensor], names: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    official, ours = pair
    given = {n: data[n] for n in names}
    with torch.no_grad():
        expected = official(data["x"], data["t"], **given)
        got = ours(data["x"], data["t"], zero_y=zero_y, **{OURS[n]: v for n, v in given.items()})
    return got, expected


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_matches_official_for_every_condition_combination(pair, zero_y, combo):
    names = {n for n, on in zip(("image", "dwpose", "randomref", "local_image"), combo) if on}
    got, expected = run_both(pair, zero_y, inputs(batch=2), names)
    assert got.shape == expected.shape == (2, 4, FRAMES, H // 8, W // 8)
    assert expected.abs().max() > 0.1  # a live output, not zeros from zero-initialised layers
    assert relative_error(got, expected) <= TOLERANCE


@pytest.mark.parametrize("names", [set(), {"image", "dwpose", "randomref", "local_image"}], ids=["none", "all"])
def test_matches_official_at_batch_one(pair, zero_y, names):
    got, expected = run_both(pair, zero_y, inputs(batch=1, seed=5), names)
    assert relative_error(got, expected) <= TOLERANCE


def test_conditions_change_the_output(pair, zero_y):
    """Each condition reaches the output (a port that ignored one would still match 'none')."""
    _, ours = pair
    data = inputs(batch=1)
    with torch.no_grad():
        base = ours(data["x"], data["t"], zero_y=zero_y)
        for names in ({"image"}, {"dwpose"}, {"local_image"}, {"dwpose", "randomref"}):
            out = ours(data["x"], data["t"], zero_y=zero_y, **{OURS[n]: data[n] for n in names})
            assert (out - base).abs().max() > 1e-3, names


def test_per_sample_presence_equals_separate_official_passes(pair, zero_y):
    """ComfyUI batches cond and uncond: sample 0 with every condition, sample 1 with none (the
    official uncond pass), sample 2 with the pose only; each equals its own official pass, and
    the rows of absent conditions (NaN here) are never read."""
    official, ours = pair
    data = inputs(batch=3, seed=11)
    present = {"pose": torch.tensor([True, False, True]), "reference_latent": torch.tensor([True, False, False]),
               "local_image": torch.tensor([True, False, False]), "image_embed": torch.tensor([True, False, False])}
    per_sample = [{"image", "dwpose", "randomref", "local_image"}, set(), {"dwpose"}]
    for name in ("image", "dwpose", "randomref", "local_image"):  # absent rows are never read
        for i, names in enumerate(per_sample):
            if name not in names:
                data[name][i] = float("nan")
    with torch.no_grad():
        got = ours(data["x"], data["t"], zero_y=zero_y, present=present,
                   **{OURS[n]: data[n] for n in ("image", "dwpose", "randomref", "local_image")})
        for i, names in enumerate(per_sample):
            one = {n: data[n][i:i + 1] for n in names}
            expected = official(data["x"][i:i + 1], data["t"][i:i + 1], **one)
            assert relative_error(got[i:i + 1], expected) <= TOLERANCE, i


def test_full_size_layout_equals_the_official_class(cache_dir):
    """Built on the meta device with the effective config: same keys and shapes, 1544 tensors,
    1,416,564,300 parameters, no buffers (official reference §1.3, pitfall 17)."""
    with torch.device("meta"):
        official = official_unet(cache_dir, (512, 768))
    ours = UniAnimateUNet(device="meta")
    theirs = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(theirs) - set(mine)) == [] and sorted(set(mine) - set(theirs)) == []
    assert mine == theirs
    assert len(mine) == 1544
    assert sum(p.numel() for p in ours.parameters()) == 1_416_564_300
    assert list(ours.buffers()) == []


def test_inputs_the_model_cannot_take_are_refused_with_the_fix(zero_y):
    unet = UniAnimateUNet(UniAnimateConfig(**SMALL)).eval()
    data = inputs(batch=1)
    with pytest.raises(UniAnimateInputError, match="needs pose"):
        unet(data["x"], data["t"], zero_y=zero_y, reference_latent=data["randomref"])
    with pytest.raises(UniAnimateInputError, match="divisible by 8"):
        unet(torch.randn(1, 4, FRAMES, 12, 8), data["t"], zero_y=zero_y)
    with pytest.raises(UniAnimateInputError, match="frame 0 is the reference pose"):
        unet(data["x"], data["t"], zero_y=zero_y, pose=data["dwpose"][:, :, 1:])
    with pytest.raises(UniAnimateInputError, match="zero_y is required"):
        unet(data["x"], data["t"])
    with pytest.raises(UniAnimateInputError, match="reference_latent but no pose"):
        unet(data["x"], data["t"], zero_y=zero_y, pose=data["dwpose"], reference_latent=data["randomref"],
             present={"pose": torch.tensor([False]), "reference_latent": torch.tensor([True])})


def test_every_layer_with_weights_is_built_through_operations():
    """ComfyUI passes comfy.ops (weight casting, offloading): no layer may bypass it."""
    made = []

    def tracked(base):
        return type(base.__name__, (base,), {"__init__": lambda self, *a, **k: (base.__init__(self, *a, **k),
                                                                                   made.append(self))[0]})

    ops = type("Ops", (), {n: tracked(getattr(torch.nn, n))
                           for n in ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")})
    unet = UniAnimateUNet(UniAnimateConfig(**SMALL), operations=ops, device="meta")
    owners = [m for m in unet.modules() if any(True for _ in m.parameters(recurse=False))]
    assert owners and all(any(m is o for o in made) for m in owners)


def test_dtype_argument_reaches_every_layer(pair, zero_y):
    """Built in float64 from the same weights: runs end to end in float64 and agrees with fp32."""
    _, ours = pair
    wide = UniAnimateUNet(UniAnimateConfig(**SMALL), dtype=torch.float64).eval()
    wide.load_state_dict(ours.state_dict(), strict=True)
    assert {p.dtype for p in wide.parameters()} == {torch.float64}
    data = inputs(batch=1)
    conditions = {OURS[n]: data[n] for n in ("image", "dwpose", "randomref", "local_image")}
    with torch.no_grad():
        got = wide(data["x"].double(), data["t"], zero_y=zero_y.double(), **{k: v.double() for k, v in conditions.items()})
        expected = ours(data["x"], data["t"], zero_y=zero_y, **conditions)
    assert got.dtype == torch.float64
    assert relative_error(got.float(), expected) <= TOLERANCE
