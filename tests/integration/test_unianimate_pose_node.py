"""LoadDWPose + UniAnimatePose in a real ComfyUI 0.30.0: the graph from LoadImage to PreviewImage
gives exactly the pose images of unianimate.pose on the same pixels (whose parity with the official
run_align_pose is tests/unit/test_unianimate_pose.py), and bad input ends in a message.

The DWPose files are the random-weight stand-ins of support.dwpose_models (official shapes),
linked into models/dwpose/ for this module only."""
from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.dwpose_models import dwpose_files

FRAMES = 3


def blocks_rgb(height: int, width: int, seed: int) -> np.ndarray:
    """Coloured rectangles (what the random detector finds "people" in), RGB uint8: the pixels whose
    BGR the DWPose unit tests use (seeds 30.. give a person with shoulders and hips there)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 40, np.uint8)
    for _ in range(14):
        y, x = rng.integers(0, height), rng.integers(0, width)
        image[y:y + rng.integers(20, 220), x:x + rng.integers(20, 220)] = rng.integers(0, 256, 3)
    return np.ascontiguousarray(image[..., ::-1])


@pytest.fixture(scope="module")
def dwpose_bed(comfy_base, cache_dir):
    """models/dwpose/<the two files> and input images: a reference, driving frames, a flat image."""
    folder = comfy_base / "models" / "dwpose"
    folder.mkdir(exist_ok=True)
    files = dwpose_files(cache_dir)
    for name, path in files.items():
        if not (folder / name).exists():
            (folder / name).symlink_to(path)
    images = {"pose_ref.png": blocks_rgb(480, 360, 30), "pose_flat.png": np.full((640, 640, 3), 0, np.uint8)}
    images.update({f"pose_frame{i}.png": blocks_rgb(480, 360, 31 + i) for i in range(FRAMES)})
    for name, pixels in images.items():
        Image.fromarray(pixels).save(comfy_base / "input" / name)
    yield files, images
    for name in files:
        (folder / name).unlink(missing_ok=True)


def pose_graph(reference: str = "pose_ref.png", frames: tuple[str, ...] = tuple(f"pose_frame{i}.png" for i in range(FRAMES)),
               detector: str = "yolox_l.onnx", pose_model: str = "dw-ll_ucoco_384.onnx", **options) -> dict:
    graph = {"dw": {"class_type": "IDA_LoadDWPose", "inputs": {"detector": detector, "pose_model": pose_model,
                                                          "provider": "CPU"}},
             "ref": {"class_type": "LoadImage", "inputs": {"image": reference}}}
    previous = None
    for index, name in enumerate(frames):
        graph[f"f{index}"] = {"class_type": "LoadImage", "inputs": {"image": name}}
        if previous is not None:
            graph[f"b{index}"] = {"class_type": "ImageBatch", "inputs": {"image1": previous, "image2": [f"f{index}", 0]}}
        previous = [f"b{index}", 0] if previous is not None else [f"f{index}", 0]
    inputs = {"dwpose": ["dw", 0], "reference_image": ["ref", 0], "driving_frames": previous,
              "alignment": "official, missing bones kept", "missing_person": "black frame", "width": 512, "height": 768}
    inputs.update(options)
    graph["pose"] = {"class_type": "UniAnimatePose", "inputs": inputs}
    graph["show_frames"] = {"class_type": "PreviewImage", "inputs": {"images": ["pose", 0]}}
    graph["show_ref"] = {"class_type": "PreviewImage", "inputs": {"images": ["pose", 1]}}
    return graph


def previews(comfy_base: Path, ui: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(comfy_base / i["type"] / i["subfolder"] / i["filename"]).convert("RGB"))
            for i in ui["images"]]


def test_schema(comfy):
    info = comfy.nodes.NODE_CLASS_MAPPINGS["UniAnimatePose"].GET_NODE_INFO_V1()
    required = info["input"]["required"]
    assert list(required) == ["dwpose", "reference_image", "driving_frames", "alignment", "missing_person",
                              "width", "height"]
    assert required["dwpose"][0] == "DWPOSE_ONNX" and info["output"] == ["IMAGE", "IMAGE"]
    assert all(spec[1].get("tooltip") for spec in required.values())
    loader = comfy.nodes.NODE_CLASS_MAPPINGS["IDA_LoadDWPose"].GET_NODE_INFO_V1()
    assert loader["output"] == ["DWPOSE_ONNX"] and info["category"] == loader["category"] == "id_animator/unianimate"
    for name in ("IDA_LoadDWPose", "UniAnimatePose"):  # execute mirrors the schema, input for input
        node = comfy.nodes.NODE_CLASS_MAPPINGS[name]
        assert list(inspect.signature(node.execute).parameters) == list(node.GET_NODE_INFO_V1()["input"]["required"])


def test_graph_equals_the_pose_package(comfy, comfy_base, dwpose_bed):
    from id_animator.unianimate.pose.draw import model_view
    from id_animator.unianimate.pose.dwpose import DWPoseModel
    from id_animator.unianimate.pose.video import pose_video

    files, images = dwpose_bed
    result = comfy.run(pose_graph())
    assert result.success, result.error_message
    frames, (reference,) = previews(comfy_base, result.outputs["show_frames"]), previews(comfy_base, result.outputs["show_ref"])
    model = DWPoseModel(files["yolox_l.onnx"], files["dw-ll_ucoco_384.onnx"], ["CPUExecutionProvider"])
    expected = pose_video(model, images["pose_ref.png"][..., ::-1], [images[f"pose_frame{i}.png"][..., ::-1]
                                                                     for i in range(FRAMES)])
    assert len(frames) == FRAMES and frames[0].shape == (768, 512, 3)
    for index, (got, want) in enumerate(zip(frames, model_view(expected.frame_canvases))):
        assert np.array_equal(got, want), f"frame {index}"
    assert np.array_equal(reference, model_view(expected.reference_canvas))
    assert reference.any() and not np.array_equal(frames[0], frames[1])


def test_black_frame_for_a_frame_without_a_person(comfy, comfy_base, dwpose_bed):
    result = comfy.run(pose_graph(frames=("pose_frame0.png", "pose_flat.png"), width=256, height=384))
    assert result.success, result.error_message
    first, empty = previews(comfy_base, result.outputs["show_frames"])
    assert first.shape == (384, 256, 3) and first.any() and not empty.any()


def test_bad_input_messages(comfy, dwpose_bed):
    result = comfy.run(pose_graph(reference="pose_flat.png"))
    assert not result.success and "No person was found in the reference image" in result.error_message
    result = comfy.run(pose_graph(frames=("pose_flat.png", "pose_frame0.png")))
    assert not result.success and "first driving frame" in result.error_message
    result = comfy.run(pose_graph(frames=("pose_frame0.png", "pose_flat.png"), missing_person="error"))
    assert not result.success and "driving frame 1" in result.error_message
    result = comfy.run(pose_graph(detector="dw-ll_ucoco_384.onnx", pose_model="yolox_l.onnx"))
    assert not result.success and "swap the two files" in result.error_message
    result = comfy.run(pose_graph(detector="missing.onnx"))
    assert not result.success
    assert "models/dwpose" in str(result.node_errors) or "missing.onnx" in str(result.node_errors)
