"""Face detection and official alignment (spec §4.1) with the real SCRFD detector and real photos.

Identity is judged by dlib's 128-d face descriptor (L2 < 0.6 = same person, dlib's threshold),
an embedding independent of insightface and of the crop under test.
"""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from id_animator.adapter.errors import IDAnimatorError
from id_animator.adapter.face_detection import (
    AlignedFace, DetectedFace, FaceDetector, align_face, available_providers, detect_and_align,
    find_detection_model, resolve_providers, select_face, to_rgb_uint8,
)

cv2 = pytest.importorskip("cv2")
dlib = pytest.importorskip("dlib")
skimage_data = pytest.importorskip("skimage.data")
from PIL import Image  # noqa: E402  (after the skips: Pillow comes with scikit-image)
from insightface.utils import face_align  # noqa: E402

SAME_PERSON = 0.6  # dlib's L2 threshold for its 128-d descriptors

# the official route below calls insightface's norm_crop, which uses a deprecated skimage API
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def scrfd_onnx(scrfd_dir: Path) -> Path:
    return scrfd_dir / "models" / "scrfd.onnx"


@pytest.fixture(scope="module")
def detector(scrfd_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceDetector:
    """A pack folder holding only scrfd.onnx, loaded once for the module."""
    pack = tmp_path_factory.mktemp("scrfd_pack")
    (pack / "scrfd.onnx").symlink_to(scrfd_onnx)
    return FaceDetector(pack, providers=resolve_providers("CPU"))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512x512 RGB, one frontal face (NASA, public domain)


@pytest.fixture(scope="module")
def solvay(scrfd_dir: Path) -> np.ndarray:
    """Solvay conference 1927: 29 faces (public domain), as RGB."""
    bgr = cv2.imread(str(scrfd_dir / "images" / "solvay_conference_1927.jpg"))
    return np.ascontiguousarray(bgr[:, :, ::-1])


class DlibIdentity:
    """dlib ResNet descriptor of an aligned crop: HOG finds the face on a black-padded crop."""

    def __init__(self) -> None:
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None:
            pytest.skip("face-recognition-models is not installed")
        # not imported: its __init__ needs pkg_resources, gone from recent setuptools
        models = Path(spec.submodule_search_locations[0]) / "models"
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.finder = dlib.get_frontal_face_detector()
        self.cache: dict[bytes, np.ndarray] = {}

    def descriptor(self, crop: np.ndarray) -> np.ndarray:
        key = crop.tobytes()
        if key not in self.cache:
            self.cache[key] = self._descriptor(crop)
        return self.cache[key]

    def _descriptor(self, crop: np.ndarray) -> np.ndarray:
        # the ArcFace crop is tight; HOG needs some context around the face
        padded = cv2.copyMakeBorder(crop, 56, 56, 56, 56, cv2.BORDER_CONSTANT, value=0)
        boxes = list(self.finder(padded, 0)) or list(self.finder(padded, 1))
        assert boxes, "dlib found no face in the aligned crop"
        box = max(boxes, key=lambda b: b.area())
        return np.array(self.encoder.compute_face_descriptor(padded, self.landmarks(padded, box)))

    def distance(self, crop_a: np.ndarray, crop_b: np.ndarray) -> float:
        return float(np.linalg.norm(self.descriptor(crop_a) - self.descriptor(crop_b)))


@pytest.fixture(scope="module")
def identity() -> DlibIdentity:
    return DlibIdentity()


@pytest.fixture(scope="module")
def reference(detector: FaceDetector, astronaut: np.ndarray) -> AlignedFace:
    aligned = detect_and_align(detector, astronaut)
    assert aligned is not None
    return aligned


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), degrees, 1.0)
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_CUBIC)


def resize(image: np.ndarray, factor: float) -> np.ndarray:
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, None, fx=factor, fy=factor, interpolation=interpolation)


def official_crop(image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """The official route verbatim: BGR image, norm_crop 112, BGR->RGB, PIL resize((224, 224))."""
    image_bgr = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    crop_bgr = face_align.norm_crop(image_bgr, landmark=kps, image_size=112)
    return np.array(Image.fromarray(cv2.cvtColor(crop_bgr, cv2.COLOR_BGR2RGB)).resize((224, 224)))


# ----------------------------------------------------------------------------- providers

def test_cpu_provider_resolves_and_is_used(detector: FaceDetector) -> None:
    assert resolve_providers("CPU") == ["CPUExecutionProvider"]
    assert resolve_providers("cpu") == ["CPUExecutionProvider"]
    assert "CPUExecutionProvider" in detector.providers_in_use


def test_auto_provider_is_available_with_cpu_fallback() -> None:
    providers = resolve_providers("auto")
    assert providers[-1] == "CPUExecutionProvider"
    assert all(p in available_providers() for p in providers)


def test_unavailable_gpu_provider_explains_how_to_get_it() -> None:
    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(IDAnimatorError) as error:
        resolve_providers("CUDA")
    message = str(error.value)
    assert "onnxruntime-gpu" in message and "CPUExecutionProvider" in message
    assert "Face detection on the GPU" in message


@pytest.mark.parametrize("available, choice, expected", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "auto", "CUDAExecutionProvider"),
    (["CoreMLExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "auto",
     "CUDAExecutionProvider"),
    (["CoreMLExecutionProvider", "CPUExecutionProvider"], "auto", "CoreMLExecutionProvider"),
    (["MIGraphXExecutionProvider", "CPUExecutionProvider"], "ROCM", "MIGraphXExecutionProvider"),
    (["ROCMExecutionProvider", "CPUExecutionProvider"], "rocm", "ROCMExecutionProvider"),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], "CUDA", "CUDAExecutionProvider"),
])
def test_gpu_choices_map_to_onnxruntime_names(available: list[str], choice: str, expected: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(available))
    assert resolve_providers(choice) == [expected, "CPUExecutionProvider"]
    assert resolve_providers("CPU") == ["CPUExecutionProvider"]


def test_unknown_provider_lists_choices() -> None:
    with pytest.raises(IDAnimatorError, match="CoreML"):
        resolve_providers("TPU")


# ----------------------------------------------------------------------------- pack folders

def tiny_recognition_onnx(path: Path) -> None:
    """A stand-in for w600k_r50.onnx: 1 input (1,3,112,112), 1 output, no detector heads."""
    onnx = pytest.importorskip("onnx")
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["683"])],
        "recognition",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, [1, 3, 112, 112])],
        [helper.make_tensor_value_info("683", onnx.TensorProto.FLOAT, [1, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))


def test_missing_pack_folder_says_where_packs_go(tmp_path: Path) -> None:
    with pytest.raises(IDAnimatorError, match="models/insightface/models"):
        FaceDetector(tmp_path / "buffalo_l")
    (tmp_path / "notes.txt").write_text("a file, not a pack")
    with pytest.raises(IDAnimatorError, match="not a folder"):
        FaceDetector(tmp_path / "notes.txt")


def test_pack_without_onnx_lists_what_it_found(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(IDAnimatorError, match="readme.txt") as error:
        FaceDetector(tmp_path)
    assert "models/insightface/models" in str(error.value)


def test_pack_without_detector_lists_the_onnx_files(tmp_path: Path) -> None:
    tiny_recognition_onnx(tmp_path / "w600k_r50.onnx")
    (tmp_path / "1k3d68.onnx").write_bytes(b"\x00not onnx at all")
    with pytest.raises(IDAnimatorError, match="w600k_r50.onnx") as error:
        FaceDetector(tmp_path)
    assert "1k3d68.onnx" in str(error.value)


def test_buffalo_like_pack_loads_only_the_detector(tmp_path: Path, scrfd_onnx: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from insightface.model_zoo import model_zoo

    shutil.copyfile(scrfd_onnx, tmp_path / "det_10g.onnx")
    tiny_recognition_onnx(tmp_path / "w600k_r50.onnx")
    tiny_recognition_onnx(tmp_path / "genderage.onnx")
    loaded: list[str] = []
    real_get_model = model_zoo.get_model

    def spy(name, **kwargs):
        loaded.append(Path(name).name)
        return real_get_model(name, **kwargs)

    monkeypatch.setattr(model_zoo, "get_model", spy)
    detector = FaceDetector(tmp_path)
    assert loaded == ["det_10g.onnx"]
    assert detector.model_file.name == "det_10g.onnx"


def test_detector_found_by_signature_when_oddly_named(tmp_path: Path, scrfd_onnx: Path) -> None:
    tiny_recognition_onnx(tmp_path / "a_recognition.onnx")
    (tmp_path / "model.onnx").symlink_to(scrfd_onnx)
    assert find_detection_model(tmp_path).name == "model.onnx"


def test_nested_pack_folder_is_found(tmp_path: Path, scrfd_onnx: Path) -> None:
    # the antelopev2 zip unpacks to antelopev2/antelopev2/*.onnx
    (tmp_path / "antelopev2").mkdir()
    (tmp_path / "antelopev2" / "scrfd_10g_bnkps.onnx").symlink_to(scrfd_onnx)
    assert find_detection_model(tmp_path).name == "scrfd_10g_bnkps.onnx"


def test_det_thresh_filters_faces(scrfd_onnx: Path, astronaut: np.ndarray,
                                  detector: FaceDetector) -> None:
    score = detector.detect(astronaut)[0].score
    strict = FaceDetector(scrfd_onnx, det_thresh=min(0.999, score + 0.05))
    assert strict.detect(astronaut) == []


# ----------------------------------------------------------------------------- detection

def test_detect_feeds_insightface_bgr(detector: FaceDetector, solvay: np.ndarray,
                                      astronaut: np.ndarray, scrfd_onnx: Path) -> None:
    from insightface.model_zoo import model_zoo

    official = model_zoo.get_model(str(scrfd_onnx), providers=["CPUExecutionProvider"])
    # Solvay is black and white (channel order cannot matter), the astronaut is in colour
    for image, count in ((solvay, 29), (astronaut, 1)):
        boxes, keypoints = official.detect(np.ascontiguousarray(image[:, :, ::-1]), input_size=(640, 640))
        faces = detector.detect(image)
        assert len(faces) == len(boxes) == count
        np.testing.assert_array_equal(np.stack([f.bbox for f in faces]), boxes[:, :4])
        np.testing.assert_array_equal(np.stack([f.kps for f in faces]), keypoints)
        np.testing.assert_array_equal([f.score for f in faces], boxes[:, 4])
        scores = [f.score for f in faces]
        assert scores == sorted(scores, reverse=True)


def test_detected_face_is_read_only(detector: FaceDetector, astronaut: np.ndarray) -> None:
    face = detector.detect(astronaut)[0]
    assert isinstance(face, DetectedFace) and face.kps.shape == (5, 2) and face.bbox.shape == (4,)
    with pytest.raises(ValueError):
        face.bbox[0] = 0.0
    x1, y1, x2, y2 = face.bbox
    assert face.area == pytest.approx(float((x2 - x1) * (y2 - y1)))


@pytest.mark.parametrize("image", [
    np.zeros((1, 1, 3), np.uint8),
    np.zeros((5, 7, 3), np.uint8),
    np.full((3, 4000, 3), 128, np.uint8),
    np.random.default_rng(0).integers(0, 256, (320, 480, 3), dtype=np.uint8),
    skimage_data.coffee(),
    skimage_data.rocket(),
], ids=["1x1", "5x7", "sliver", "noise", "coffee", "rocket"])
def test_no_face_gives_none(detector: FaceDetector, image: np.ndarray) -> None:
    assert detect_and_align(detector, image) is None


# ----------------------------------------------------------------------------- alignment

def test_crop_is_224_rgb_uint8_and_the_official_crop(reference: AlignedFace,
                                                     astronaut: np.ndarray) -> None:
    assert reference.crop.shape == (224, 224, 3) and reference.crop.dtype == np.uint8
    assert reference.crop.flags["C_CONTIGUOUS"]
    assert reference.faces_found == 1
    np.testing.assert_array_equal(reference.crop, official_crop(astronaut, reference.face.kps))


def test_rgb_crop_equals_official_bgr_route_on_many_faces(detector: FaceDetector,
                                                          solvay: np.ndarray) -> None:
    for face in detector.detect(solvay)[::7]:
        np.testing.assert_array_equal(align_face(solvay, face.kps), official_crop(solvay, face.kps))


def test_crop_puts_the_eyes_on_the_arcface_template(reference: AlignedFace) -> None:
    eyes = reference.face.kps[:2]
    matrix = face_align.estimate_norm(reference.face.kps, 112)
    mapped = (matrix[:, :2] @ eyes.T).T + matrix[:, 2]
    np.testing.assert_allclose(mapped, face_align.arcface_dst[:2], atol=3.0)


@pytest.mark.parametrize("variant", ["hflip", "rotate 15", "scale 0.6", "scale 1.7"])
def test_variants_of_one_photo_give_the_same_person(variant: str, detector: FaceDetector,
                                                    astronaut: np.ndarray, reference: AlignedFace,
                                                    identity: DlibIdentity) -> None:
    image = {
        "hflip": lambda: astronaut[:, ::-1],
        "rotate 15": lambda: rotate(astronaut, 15),
        "scale 0.6": lambda: resize(astronaut, 0.6),
        "scale 1.7": lambda: resize(astronaut, 1.7),
    }[variant]()
    aligned = detect_and_align(detector, image)
    assert aligned is not None
    assert identity.distance(aligned.crop, reference.crop) < SAME_PERSON


def test_other_people_are_not_the_same_person(detector: FaceDetector, solvay: np.ndarray,
                                              reference: AlignedFace, identity: DlibIdentity) -> None:
    for face in detector.detect(solvay)[:4]:
        assert identity.distance(align_face(solvay, face.kps), reference.crop) >= SAME_PERSON


def test_huge_image_is_detected_downscaled_and_cropped_at_full_size(
        detector: FaceDetector, astronaut: np.ndarray, reference: AlignedFace,
        identity: DlibIdentity) -> None:
    factor = 4000 / 512
    huge = cv2.resize(astronaut, (4000, 4000), interpolation=cv2.INTER_CUBIC)
    aligned = detect_and_align(detector, huge)
    assert aligned is not None and aligned.crop.shape == (224, 224, 3)
    # keypoints are mapped back to the 4000 px image: within 1 % of the face width of the
    # 512 px keypoints scaled up (unmapped, they would be off by hundreds of pixels)
    face_width = float(aligned.face.bbox[2] - aligned.face.bbox[0])
    np.testing.assert_allclose(aligned.face.kps, reference.face.kps * factor, atol=0.01 * face_width)
    assert identity.distance(aligned.crop, reference.crop) < SAME_PERSON


# ----------------------------------------------------------------------------- input formats

def test_float_uint16_and_rgba_inputs_give_the_identical_crop(detector: FaceDetector,
                                                              astronaut: np.ndarray,
                                                              reference: AlignedFace) -> None:
    alpha = np.random.default_rng(1).integers(0, 256, astronaut.shape[:2] + (1,), dtype=np.uint8)
    inputs = {
        "float32 [0,1] (ComfyUI)": astronaut.astype(np.float32) / 255.0,
        "float64": astronaut / 255.0,
        "uint16": astronaut.astype(np.uint16) * 257,
        "RGBA": np.concatenate([astronaut, alpha], axis=2),
    }
    for name, image in inputs.items():
        aligned = detect_and_align(detector, image)
        assert aligned is not None, name
        np.testing.assert_array_equal(aligned.crop, reference.crop, err_msg=name)


@pytest.mark.parametrize("layout", ["HxW", "HxWx1", "HxWx3 grey"])
def test_grayscale_input_gives_the_same_person(layout: str, detector: FaceDetector,
                                               astronaut: np.ndarray, reference: AlignedFace,
                                               identity: DlibIdentity) -> None:
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    image = {"HxW": grey, "HxWx1": grey[:, :, None], "HxWx3 grey": np.stack([grey] * 3, axis=2)}[layout]
    aligned = detect_and_align(detector, image)
    assert aligned is not None
    assert np.array_equal(aligned.crop[..., 0], aligned.crop[..., 1])  # still grey, now 3 channels
    assert identity.distance(aligned.crop, reference.crop) < SAME_PERSON


def test_to_rgb_uint8_conversions() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(rgb.astype(np.float32) / 255.0), rgb)  # lossless
    np.testing.assert_array_equal(to_rgb_uint8(rgb.astype(np.uint16) * 257), rgb)
    assert to_rgb_uint8(np.array([[0, 128, 65535]], np.uint16))[0, :, 0].tolist() == [0, 0, 255]
    assert to_rgb_uint8(np.array([[-0.01, 0.5, 1.01]], np.float32))[0, :, 0].tolist() == [0, 128, 255]
    grey_alpha = np.stack([rgb[..., 0], rgb[..., 1]], axis=2)  # LA: alpha dropped
    np.testing.assert_array_equal(to_rgb_uint8(grey_alpha), np.stack([rgb[..., 0]] * 3, axis=2))
    flipped = to_rgb_uint8(rgb[:, ::-1])
    assert flipped.flags["C_CONTIGUOUS"] and flipped.shape == (6, 5, 3)


@pytest.mark.parametrize("image, problem", [
    (np.array([[[0.1, np.nan, 0.2]]], np.float32), "NaN"),
    (np.array([[[0.1, np.inf, 0.2]]], np.float32), "NaN or infinite"),
    (np.full((4, 4, 3), 200.0, np.float32), r"\[0, 1\]"),
    (np.zeros((4, 4, 3), np.int32), "int32"),
    (np.zeros((2, 4, 4, 3), np.uint8), "one at a time"),
    (np.zeros((4, 4, 5), np.uint8), "shape"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
], ids=["nan", "inf", "float-255", "int32", "batch", "5-channels", "empty"])
def test_to_rgb_uint8_rejects_bad_images(image: np.ndarray, problem: str) -> None:
    with pytest.raises(IDAnimatorError, match=problem):
        to_rgb_uint8(image)


def test_align_face_rejects_bad_keypoints(astronaut: np.ndarray) -> None:
    with pytest.raises(IDAnimatorError, match="keypoints"):
        align_face(astronaut, np.zeros((4, 2)))
    with pytest.raises(IDAnimatorError, match="keypoints"):
        align_face(astronaut, np.full((5, 2), np.nan))


# ----------------------------------------------------------------------------- face selection

def test_most_confident_and_largest(detector: FaceDetector, solvay: np.ndarray) -> None:
    faces = detector.detect(solvay)
    confident = select_face(faces, "most confident")
    largest = select_face(faces, "largest")
    assert confident is faces[0] and confident.score == max(f.score for f in faces)
    assert largest.area == max(f.area for f in faces)
    assert largest is not confident  # on this photo they differ, so the modes are really distinct


def test_index_counts_faces_left_to_right(detector: FaceDetector, solvay: np.ndarray) -> None:
    faces = detector.detect(solvay)
    picked = [select_face(faces, "index", i) for i in range(len(faces))]
    centres = [f.centre_x for f in picked]
    assert centres == sorted(centres)
    assert len({id(f) for f in picked}) == len(faces)  # every face reachable exactly once
    with pytest.raises(IDAnimatorError, match="29 face"):
        select_face(faces, "index", 29)
    with pytest.raises(IDAnimatorError, match="29 face"):
        select_face(faces, "index", -1)


def test_detect_and_align_by_index(detector: FaceDetector, solvay: np.ndarray) -> None:
    solvay = resize(solvay, 0.5)  # under MAX_DETECT_SIDE, so detection runs on this very image
    faces = detector.detect(solvay)
    leftmost = min(faces, key=lambda f: f.centre_x)
    first = detect_and_align(detector, solvay, mode="index", index=0)
    second = detect_and_align(detector, solvay, mode="index", index=1)
    assert first is not None and second is not None and first.faces_found == 29
    np.testing.assert_array_equal(first.face.bbox, leftmost.bbox)
    np.testing.assert_array_equal(first.crop, align_face(solvay, leftmost.kps))
    assert not np.array_equal(first.crop, second.crop)
    assert first.face.centre_x < second.face.centre_x


def test_selection_edge_cases() -> None:
    assert select_face([], "largest") is None
    with pytest.raises(IDAnimatorError, match="most confident"):
        select_face([], "biggest")


class ScriptedDetector:
    """Duck-typed detector that finds a face only at some sizes, recording the sizes asked."""

    def __init__(self, finds_at: int, face: DetectedFace, fixed: int | None = None) -> None:
        self.finds_at, self.face, self.fixed, self.asked = finds_at, face, fixed, []

    def input_size(self, det_size: int) -> tuple[int, int]:
        size = self.fixed or det_size
        return size, size

    def detect(self, image_rgb: np.ndarray, det_size: int = 640) -> list[DetectedFace]:
        self.asked.append(det_size)
        return [self.face] if self.input_size(det_size)[0] == self.finds_at else []


def test_official_size_first_then_retries_until_a_face_is_found(reference: AlignedFace,
                                                                astronaut: np.ndarray) -> None:
    official = ScriptedDetector(finds_at=320, face=reference.face)
    assert detect_and_align(official, astronaut) is not None and official.asked == [320]
    scripted = ScriptedDetector(finds_at=384, face=reference.face)
    aligned = detect_and_align(scripted, astronaut)
    assert scripted.asked == [320, 640, 512, 384]
    assert aligned is not None
    np.testing.assert_array_equal(aligned.crop, reference.crop)
    # a fixed-size model runs once, however many sizes are listed
    fixed = ScriptedDetector(finds_at=0, face=reference.face, fixed=640)
    assert detect_and_align(fixed, astronaut) is None and fixed.asked == [320]  # asks 320, runs at 640
