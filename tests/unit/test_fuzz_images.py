"""Fuzzing the image path of FaceEncode (issue 6): whatever array or IMAGE tensor arrives,
`to_rgb_uint8` and `detect_and_align` either succeed with their documented output or raise
IDAnimatorError -- never another exception, never a changed input.

`detect_and_align` runs the real SCRFD detector, on noise and on the astronaut photo
transformed (resized, cropped, re-typed, channels changed, a NaN or inf dropped in).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays, from_dtype

from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.face_detection import (
    CONVERT_ROWS, CROP_SIZE, SELECT_MODES, AlignedFace, FaceDetector, detect_and_align, resolve_providers, to_rgb_uint8,
)

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")

NUMPY_DTYPES = ["uint8", "uint16", ">u2", "int8", "int16", "int32", "int64", "float16", "float32",
                "float64", ">f4", "bool", "complex64"]
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8]
SPECIAL_VALUES = [float("nan"), float("inf"), -float("inf"), -1.5, 2.5, 300.0]

# any rank, with HxW and HxWxC (C around 1..4) drawn more often than the rest
SHAPES = st.one_of(
    st.tuples(st.integers(0, 24), st.integers(0, 24), st.integers(0, 6)),
    st.tuples(st.integers(0, 24), st.integers(0, 24)),
    st.lists(st.integers(0, 6), max_size=5).map(tuple),
)


def element_values(dtype: np.dtype) -> st.SearchStrategy:
    """Mostly in-range pixels; for floats also NaN, inf and values outside [0, 1]."""
    if dtype.kind == "f":
        return st.one_of(from_dtype(dtype, min_value=0.0, max_value=1.0),
                         from_dtype(dtype, allow_nan=True, allow_infinity=True))
    return from_dtype(dtype)


NUMPY_IMAGES = st.sampled_from(NUMPY_DTYPES).map(np.dtype).flatmap(
    lambda dtype: arrays(dtype, SHAPES, elements=element_values(dtype)))


def assert_rgb_uint8(result: np.ndarray, height: int, width: int) -> None:
    assert isinstance(result, np.ndarray) and result.dtype == np.uint8
    assert result.shape == (height, width, 3) and result.flags.c_contiguous


def image_size(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], shape[1]


@settings(max_examples=300, deadline=None)
@given(image=NUMPY_IMAGES)
def test_property_to_rgb_uint8_on_any_array(image: np.ndarray) -> None:
    before = image.copy()
    try:
        result = to_rgb_uint8(image)
    except IDAnimatorError as error:
        valid = image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) > 0
        assert str(error) and not valid, f"a plain 8-bit RGB(A) image was refused: {error}"
    else:
        assert_rgb_uint8(result, *image_size(image.shape))
        if image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] in (3, 4):
            assert np.array_equal(result, image[:, :, :3])  # 8-bit colour passes through unchanged
        if not image.dtype.isnative:  # big-endian samples read as their native-order values
            assert np.array_equal(result, to_rgb_uint8(image.astype(image.dtype.newbyteorder("="))))
    assert before.tobytes() == image.tobytes(), "the caller's image was modified"


PLAIN_8_BIT = arrays(np.uint8, st.tuples(st.integers(1, 64), st.integers(1, 64), st.sampled_from([3, 4])))


@settings(max_examples=100, deadline=None)
@given(image=PLAIN_8_BIT)
def test_property_plain_8_bit_rgb_is_always_accepted_unchanged(image: np.ndarray) -> None:
    """The refusals above must never reach a valid photo: any HxWx3/4 uint8 array converts."""
    assert np.array_equal(to_rgb_uint8(image), image[:, :, :3])


TORCH_IMAGES = st.tuples(st.sampled_from(TORCH_DTYPES), st.integers(1, 20), st.integers(1, 20),
                         st.sampled_from([1, 3, 4]), st.integers(0, 2 ** 32 - 1),
                         st.none() | st.sampled_from(SPECIAL_VALUES))


def make_tensor(dtype: torch.dtype, height: int, width: int, channels: int, seed: int,
                special: float | None) -> torch.Tensor:
    """One photo of a ComfyUI IMAGE batch (H, W, C), in [0, 1], maybe with one odd value."""
    gen = torch.Generator().manual_seed(seed)
    photo = torch.rand(height, width, channels, generator=gen)
    if dtype == torch.uint8:
        return (photo * 255).round().to(torch.uint8)
    photo = photo.to(dtype)
    if special is not None:
        photo[height // 2, width // 2, 0] = special
    return photo


@settings(max_examples=150, deadline=None)
@given(spec=TORCH_IMAGES)
def test_property_to_rgb_uint8_on_image_tensors(spec: tuple) -> None:
    """FaceEncode hands over one photo of the IMAGE batch: a tensor in any float dtype ComfyUI uses."""
    photo = make_tensor(*spec)
    before = photo.clone()
    special = spec[-1]
    try:
        result = to_rgb_uint8(photo)
    except IDAnimatorError as error:
        assert special is not None and photo.dtype != torch.uint8, f"a valid IMAGE was refused: {error}"
    else:
        assert_rgb_uint8(result, photo.shape[0], photo.shape[1])
        if special is None and photo.dtype != torch.uint8:
            expected = (photo.float() * 255).round().clamp(0, 255).to(torch.uint8).numpy()
            colour = expected[:, :, :3] if expected.shape[2] >= 3 else np.repeat(expected, 3, axis=2)
            assert np.array_equal(result, colour)
    assert torch.equal(before.nan_to_num(), photo.nan_to_num()), "the caller's IMAGE was modified"


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint16"])
def test_conversion_by_row_slices_equals_the_whole_image_at_once(dtype: str) -> None:
    rng = np.random.default_rng(3)
    rows = 2 * CONVERT_ROWS + 37  # two full slices and a partial one
    if dtype == "uint16":
        image = rng.integers(0, 65536, (rows, 50, 3), dtype=np.uint16)
        expected = ((image.astype(np.uint64) * 255 + 32767) // 65535).astype(np.uint8)
    else:
        image = rng.random((rows, 50, 3)).astype(dtype)
        expected = np.clip(np.rint(image.astype(np.float32) * np.float32(255)), 0, 255).astype(np.uint8)
    assert np.array_equal(to_rgb_uint8(image), expected)


def test_huge_float_image_converts_without_a_full_size_float_copy() -> None:
    """Regression: a [0, 1] float IMAGE was scaled in one float32 temporary as large as the image."""
    import tracemalloc

    image = np.full((4000, 4000, 3), 0.5, dtype=np.float32)  # 192 MB, a 16-megapixel IMAGE
    tracemalloc.start()
    try:
        result = to_rgb_uint8(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.shape == (4000, 4000, 3) and int(result[0, 0, 0]) == 128
    # the uint8 result is a quarter of the float image; the old code added a full float32 copy (1.25x)
    assert peak < 0.5 * image.nbytes, f"peak {peak / 2**20:.0f} MiB for a {image.nbytes / 2**20:.0f} MiB image"


# ----------------------------------------------------------------------------- detection

@pytest.fixture(scope="module")
def detector(scrfd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceDetector:
    pack = tmp_path_factory.mktemp("scrfd_pack")
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    return FaceDetector(pack, providers=resolve_providers("CPU"))


ASTRONAUT = skimage_data.astronaut()  # 512x512 RGB, one frontal face

PHOTO_SPECS = st.fixed_dictionaries({
    # mostly the face photo at sane sizes, so that the success path is fuzzed as well
    "source": st.sampled_from(["astronaut"] * 4 + ["noise", "flat"]),
    "side": st.one_of(st.integers(96, 700), st.integers(1, 700)),
    "aspect": st.one_of(st.floats(0.6, 1.6), st.floats(0.05, 8.0)),
    "crop": st.tuples(st.floats(0, 0.6), st.floats(0, 0.6)),
    "layout": st.sampled_from(["RGB", "RGBA", "grey HxW", "grey HxWx1", "grey+alpha"]),
    "dtype": st.sampled_from(["uint8", "uint16", "float32", "float16", "float64", "torch.float32",
                              "torch.float16", "torch.bfloat16"]),
    "special": st.one_of(st.none(), st.none(), st.sampled_from(SPECIAL_VALUES)),
    "mode": st.sampled_from(SELECT_MODES),
    "index": st.one_of(st.just(0), st.integers(-1, 3)),
})


def make_photo(spec: dict) -> np.ndarray | torch.Tensor:
    """An image built from the spec: a source, a size and crop, a channel layout and a dtype."""
    rng = np.random.default_rng(spec["side"])
    if spec["source"] == "astronaut":
        top, left = (int(f * 512) for f in spec["crop"])
        image = ASTRONAUT[top // 4:, left // 4:]
    elif spec["source"] == "noise":
        image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    else:
        image = np.full((8, 8, 3), 127, dtype=np.uint8)
    height = spec["side"]
    width = max(1, min(2000, round(height * spec["aspect"])))
    image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    alpha = np.full(grey.shape + (1,), 200, dtype=np.uint8)
    image = {"RGB": image, "RGBA": np.concatenate([image, alpha], axis=2), "grey HxW": grey,
             "grey HxWx1": grey[:, :, None],
             "grey+alpha": np.concatenate([grey[:, :, None], alpha], axis=2)}[spec["layout"]]
    dtype = spec["dtype"]
    if dtype == "uint16":
        return image.astype(np.uint16) * 257
    if dtype == "uint8":
        return image
    floats = image.astype(np.float32) / 255.0
    if spec["special"] is not None:  # in a colour channel: an odd value in the dropped alpha is harmless
        floats[(floats.shape[0] // 2, floats.shape[1] // 2) + (0,) * (floats.ndim - 2)] = spec["special"]
    if dtype.startswith("torch."):
        return torch.from_numpy(floats).to(getattr(torch, dtype.removeprefix("torch.")))
    return floats.astype(dtype)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=PHOTO_SPECS)
def test_property_detect_and_align_finds_none_one_or_raises_ours(detector: FaceDetector, spec: dict) -> None:
    photo = make_photo(spec)
    try:
        aligned = detect_and_align(detector, photo, spec["mode"], spec["index"])
    except IDAnimatorError as error:
        message = str(error)
        event("face found, index out of range" if "out of range" in message else "IDAnimatorError")
        assert spec["special"] is not None or spec["index"] < 0 or "out of range" in message, message
        return
    assert spec["special"] is None or spec["dtype"].startswith("uint") or -1 <= spec["special"] <= 2, \
        "an image with NaN, inf or out-of-range values was accepted"
    event("no face" if aligned is None else "face")
    if aligned is None:
        return
    assert isinstance(aligned, AlignedFace) and aligned.faces_found >= 1
    assert aligned.crop.dtype == np.uint8 and aligned.crop.shape == (CROP_SIZE, CROP_SIZE, 3)
    assert np.isfinite(aligned.face.kps).all() and aligned.face.score > 0
