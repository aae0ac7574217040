"""Identity scores (adapter/face_recognition.py): insightface's recognition path to fp32
precision, pack folders, the scoring rules, and a real identity judged through the same scoring
code with dlib's real face recognition model standing in for ArcFace (no ArcFace weights can be
had offline; see reference/offline-test-assets.md)."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from id_animator.adapter import face_recognition as fr
from id_animator.adapter.errors import IDAnimatorError, NoFaceError
from id_animator.adapter.face_detection import DetectedFace, FaceDetector, norm_crop, resolve_providers
from id_animator.adapter.score_plot import Series, plot_scores
from support.arcface import arcface_model, write_arcface

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")
from insightface.model_zoo import model_zoo  # noqa: E402
from insightface.model_zoo.arcface_onnx import ArcFaceONNX  # noqa: E402
from insightface.utils import face_align  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def detector(scrfd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> FaceDetector:
    pack = tmp_path_factory.mktemp("scrfd_only")
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    return FaceDetector(pack, providers=resolve_providers("CPU"))


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def solvay(scrfd_dir: Path) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(scrfd_dir / "images" / "solvay_conference_1927.jpg"))[:, :, ::-1])


@pytest.fixture(scope="module")
def astronaut_face(detector: FaceDetector, astronaut: np.ndarray) -> DetectedFace:
    faces = fr.detector_function(detector)(astronaut)
    assert len(faces) == 1
    return faces[0]


def make_pack(folder: Path, scrfd_dir: Path, **arcface_options) -> Path:
    """A buffalo_l-like pack: the real SCRFD detector and a random ArcFace-layout recogniser."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "det_scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    write_arcface(folder / "w600k_r50.onnx", **arcface_options)
    return folder


# ----------------------------------------------------------------------------- insightface equality

def test_alignment_is_insightface_norm_crop(astronaut: np.ndarray, astronaut_face: DetectedFace,
                                            solvay: np.ndarray, detector: FaceDetector) -> None:
    """Bit for bit on the BGR image insightface reads (warpAffine works per channel)."""
    bgr = np.ascontiguousarray(astronaut[:, :, ::-1])
    ours = norm_crop(astronaut, astronaut_face.kps, 112)
    theirs = face_align.norm_crop(bgr, landmark=astronaut_face.kps, image_size=112)
    assert ours.shape == (112, 112, 3)
    np.testing.assert_array_equal(ours, theirs[:, :, ::-1])
    solvay_bgr = np.ascontiguousarray(solvay[:, :, ::-1])
    for face in fr.detector_function(detector)(solvay)[:8]:
        np.testing.assert_array_equal(norm_crop(solvay, face.kps, 112),
                                      face_align.norm_crop(solvay_bgr, face.kps, 112)[:, :, ::-1])


@pytest.mark.parametrize("batch, mxnet", [(1, False), ("None", False), ("None", True)],
                         ids=["fixed batch 1", "dynamic batch", "mxnet export (Sub/Mul inside)"])
def test_embedding_equals_insightface_get_feat_and_get(tmp_path: Path, scrfd_dir: Path, astronaut: np.ndarray,
                                                       astronaut_face: DetectedFace, solvay: np.ndarray,
                                                       detector: FaceDetector, batch, mxnet: bool) -> None:
    pack = make_pack(tmp_path / "pack", scrfd_dir, seed=3, batch=batch, mxnet=mxnet)
    ours = fr.FaceRecognizer(pack, ["CPUExecutionProvider"])
    theirs = model_zoo.get_model(str(pack / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(theirs, ArcFaceONNX)  # insightface's router sees the ArcFace layout
    assert (ours.input_mean, ours.input_std) == (theirs.input_mean, theirs.input_std) == \
        ((0.0, 1.0) if mxnet else (127.5, 127.5))
    faces = [(astronaut, astronaut_face)] + [(solvay, f) for f in fr.detector_function(detector)(solvay)[:5]]
    crops = np.stack([ours.crop(image, face) for image, face in faces])
    embeddings = ours.embed(crops)
    assert embeddings.shape == (len(faces), 512) and embeddings.dtype == np.float32
    for (image, face), crop, embedding in zip(faces, crops, embeddings):
        # insightface is fed BGR (cv2.imread) and swaps to RGB in blobFromImages
        reference = theirs.get_feat(np.ascontiguousarray(crop[:, :, ::-1])).reshape(-1)
        scale = float(np.abs(reference).max())
        np.testing.assert_allclose(embedding, reference, rtol=0, atol=2e-6 * scale)

        class Face:  # what ArcFaceONNX.get reads and writes
            kps = face.kps
        full = theirs.get(np.ascontiguousarray(image[:, :, ::-1]), Face())
        np.testing.assert_allclose(ours(image, face), full, rtol=0, atol=2e-6 * scale)
    # the embedding depends on the face: different people give different vectors
    assert fr.cosine(embeddings[0], embeddings[1]) < 0.999


def test_cosine_matches_insightface_compute_sim(tmp_path: Path, scrfd_dir: Path) -> None:
    pack = make_pack(tmp_path / "pack", scrfd_dir)
    theirs = ArcFaceONNX(str(pack / "w600k_r50.onnx"))
    a, b = np.random.RandomState(1).randn(2, 512).astype(np.float32)
    assert fr.cosine(a, b) == pytest.approx(float(theirs.compute_sim(a, b)), abs=1e-6)


# ----------------------------------------------------------------------------- pack folders

def test_pack_without_recognition_model_says_what_it_holds(tmp_path: Path, scrfd_dir: Path) -> None:
    pack = tmp_path / "scrfd"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    with pytest.raises(IDAnimatorError) as error:
        fr.FaceRecognizer(pack)
    message = str(error.value)
    assert "no face recognition model" in message and "scrfd.onnx" in message
    assert "w600k_r50.onnx" in message and "glintr100.onnx" in message and "models/insightface/models" in message
    with pytest.raises(IDAnimatorError, match="not found"):
        fr.find_recognition_model(tmp_path / "buffalo_l")


def test_recognition_model_is_found_by_its_layout(tmp_path: Path, scrfd_dir: Path) -> None:
    """antelopev2 unzips one level deeper and names its model glintr100; a 192 px landmark model
    (1k3d68 / 2d106det in buffalo_l) is not a recogniser."""
    import onnx

    pack = tmp_path / "antelopev2"
    (pack / "antelopev2").mkdir(parents=True)
    (pack / "antelopev2" / "scrfd_10g_bnkps.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    landmark = arcface_model(seed=1)
    landmark.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 192
    landmark.graph.input[0].type.tensor_type.shape.dim[3].dim_value = 192
    onnx.save(landmark, str(pack / "antelopev2" / "2d106det.onnx"))
    assert fr.pack_contents(pack) == ["antelopev2/2d106det.onnx", "antelopev2/scrfd_10g_bnkps.onnx"]
    with pytest.raises(IDAnimatorError, match="2d106det.onnx"):
        fr.find_recognition_model(pack)
    write_arcface(pack / "antelopev2" / "glintr100.onnx")
    assert fr.find_recognition_model(pack).name == "glintr100.onnx"
    assert fr.FaceRecognizer(pack).size == 112


# ----------------------------------------------------------------------------- scoring rules

def fixed_embedder(table: dict[int, np.ndarray]):
    """An embedder keyed by the face's rounded x1 (scoring rules without a model)."""
    return lambda image, face: table[int(round(float(face.bbox[0])))]


def face_at(x1: float, size: float = 10.0, score: float = 0.9) -> DetectedFace:
    from id_animator.adapter.face_detection import _make_face

    return _make_face(np.array([x1, 0, x1 + size, size]), np.zeros((5, 2)), score)


def test_frames_without_a_face_are_reported_not_scored_zero() -> None:
    e = np.eye(4)
    detections = {0: [face_at(1)], 1: [], 2: [face_at(2)], 3: []}
    detect = lambda image: detections[int(image[0, 0, 0])]  # noqa: E731  the frame index in pixel 0
    embed = fixed_embedder({1: e[0] + 0.5 * e[1], 2: e[0] - 0.5 * e[1]})
    frames = [(i, np.full((4, 4, 3), i, np.uint8)) for i in range(4)]
    scores = fr.score_frames(frames, e[0], detect, embed)
    assert scores.missing == [1, 3]
    assert [f.faces_found for f in scores.frames] == [1, 0, 1, 0]
    assert scores.frames[1].similarity is None and scores.frames[1].face is None
    expected = 1 / math.sqrt(1.25)
    assert scores.mean == pytest.approx(expected)  # 2 faces, not (2 faces + two zeros) / 4
    assert scores.face_share == 0.5
    assert scores.stability == pytest.approx((1 - 0.25) / 1.25)  # frames 0 and 2: consecutive faces
    per_frame = scores.per_frame()
    assert math.isnan(per_frame[1]) and per_frame[0] == pytest.approx(expected)
    none = fr.score_frames([(0, np.zeros((4, 4, 3), np.uint8))], e[0], lambda image: [], embed)
    assert math.isnan(none.mean) and none.face_share == 0.0 and math.isnan(none.stability)


def test_frame_face_choice() -> None:
    e = np.eye(3)
    faces = [face_at(1, size=30, score=0.6), face_at(50, size=10, score=0.95), face_at(80, size=20, score=0.7)]
    embed = fixed_embedder({1: e[1], 50: e[2], 80: e[0] + 0.1 * e[1]})
    image = np.zeros((4, 4, 3), np.uint8)
    chosen = {mode: fr.score_frame(0, image, e[0], lambda _: faces, embed, mode) for mode in fr.FRAME_FACE_MODES}
    assert chosen["largest"].face is faces[0] and chosen["largest"].similarity == pytest.approx(0.0)
    assert chosen["most confident"].face is faces[1]
    assert chosen["best match"].face is faces[2] and chosen["best match"].similarity > 0.99
    assert all(c.faces_found == 3 for c in chosen.values())
    with pytest.raises(IDAnimatorError, match="largest"):
        fr.score_frame(0, image, e[0], lambda _: faces, embed, "first")


def test_reference_is_the_unit_mean_of_unit_embeddings() -> None:
    reference = fr.reference_embedding(np.array([[3.0, 0.0], [0.0, 0.5]]))
    np.testing.assert_allclose(reference, [math.sqrt(0.5), math.sqrt(0.5)])
    assert fr.stability([np.array([1.0, 0.0])]) != fr.stability([np.array([1.0, 0.0])])  # NaN below two
    assert fr.stability([np.array([1.0, 0.0]), np.array([2.0, 0.0]), np.array([0.0, 1.0])]) == pytest.approx(0.5)


def test_reference_without_a_face_names_the_photo(detector: FaceDetector, astronaut: np.ndarray) -> None:
    rocket = skimage_data.rocket()
    embed = lambda image, face: np.ones(4)  # noqa: E731
    with pytest.raises(NoFaceError, match=r"reference photo\(s\) 1 of 2"):
        fr.embed_references([astronaut, rocket], fr.detector_function(detector), embed)
    with pytest.raises(NoFaceError, match="No reference photo"):
        fr.embed_references([], fr.detector_function(detector), embed)


# ----------------------------------------------------------------------------- a real identity

class DlibEmbedder:
    """dlib's real 128-d face recognition (ResNet, CC0 weights) on the SCRFD face: its own 5-point
    landmarks inside the SCRFD box, then its descriptor. Plugged into the scoring code where the
    pack's ArcFace model goes."""

    def __init__(self) -> None:
        dlib = pytest.importorskip("dlib")
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None:
            pytest.skip("face-recognition-models is not installed")
        models = Path(spec.submodule_search_locations[0]) / "models"  # not imported: needs pkg_resources
        self.dlib = dlib
        self.encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))

    def __call__(self, image: np.ndarray, face: DetectedFace) -> np.ndarray:
        x1, y1, x2, y2 = (int(round(float(v))) for v in face.bbox)
        shape = self.landmarks(image, self.dlib.rectangle(x1, y1, x2, y2))
        return np.array(self.encoder.compute_face_descriptor(image, shape))


def face_frames(solvay: np.ndarray, faces: list[DetectedFace], count: int) -> list[np.ndarray]:
    """The `count` largest Solvay faces, each with its surroundings, upscaled x3 as a frame."""
    frames = []
    for face in sorted(faces, key=lambda f: -f.area)[:count]:
        x1, y1, x2, y2 = face.bbox.astype(int)
        w, h = x2 - x1, y2 - y1
        crop = solvay[max(0, y1 - h):y2 + h, max(0, x1 - w):x2 + w]
        frames.append(cv2.resize(crop, (crop.shape[1] * 3, crop.shape[0] * 3), interpolation=cv2.INTER_CUBIC))
    return frames


def test_real_identity_scores_the_same_person_far_above_others(detector: FaceDetector, astronaut: np.ndarray,
                                                                solvay: np.ndarray) -> None:
    embed = DlibEmbedder()
    detect = fr.detector_function(detector)
    reference = fr.embed_references([astronaut], detect, embed)
    same = [np.ascontiguousarray(astronaut[:, ::-1]),  # mirrored
            cv2.resize(astronaut[20:400, 80:420], (300, 335), interpolation=cv2.INTER_AREA)]  # recropped
    noise = np.random.RandomState(0).randint(0, 256, (256, 256, 3), dtype=np.uint8)
    others = face_frames(solvay, detect(solvay), 6)
    video = same + [noise, skimage_data.rocket()] + others
    scores = fr.score_frames(enumerate(video), reference, detect, embed)
    similarity = scores.per_frame()
    same_scores, other_scores = similarity[:2], similarity[4:]
    print(f"dlib cosine: astronaut vs mirrored/recropped {same_scores}, vs Solvay faces "
          f"{[round(s, 3) for s in other_scores]}; mean {scores.mean:.3f}, face share {scores.face_share:.3f}, "
          f"stability {scores.stability:.3f}")
    assert scores.missing == [2, 3]  # noise and the rocket: counted as frames without a face
    assert scores.face_share == pytest.approx(8 / 10)
    assert min(same_scores) > 0.97
    assert max(other_scores) < 0.9
    assert min(same_scores) - max(other_scores) > 0.1  # dlib's cosines are compressed: 0.1 is far
    # the astronaut between two Solvay faces: "best match" finds her, "largest" takes a Solvay face
    tiles = [cv2.resize(image, (320, 320), interpolation=cv2.INTER_AREA) for image in (others[0], astronaut, others[1])]
    row = np.concatenate(tiles, axis=1)
    best = fr.score_frame(0, row, reference, detect, embed, "best match")
    largest = fr.score_frame(0, row, reference, detect, embed, "largest")
    assert best.faces_found >= 3 and best.similarity > 0.97 and 320 <= best.face.centre_x < 640
    assert largest.similarity < 0.9


# ----------------------------------------------------------------------------- the plot

def test_plot_marks_frames_without_a_face_and_is_deterministic() -> None:
    values = [0.8, None, 0.7, 0.75, None, 0.6]
    draw = lambda: plot_scores([Series("face similarity", values)], "mean 0.71", no_face=[1, 4])  # noqa: E731
    image = draw()
    assert image.shape == (320, 768, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, draw())
    red = np.all(image == (214, 39, 40), axis=2)
    assert red.sum() > 20
    clean = plot_scores([Series("face similarity", [0.8, 0.7])], "mean 0.75")
    assert not np.all(clean == (214, 39, 40), axis=2).any()
    blue = np.all(image == (31, 119, 180), axis=2)
    assert blue.sum() > 50
