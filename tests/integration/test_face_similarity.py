"""FaceSimilarity in a real ComfyUI (issue 15): the schema, a render-and-score graph after
ApplyFaceAdapter sampling (the detector LoadIDAnimator holds reused), real photos as frames
(numbers equal to the adapter's own scoring), a second queue that loads nothing (issue 19, item 4),
and bad inputs ending with clear messages.

The test bed's insightface pack (`scrfd`, support.models.scrfd_pack) holds the real SCRFD
detector and a random-weight ArcFace-layout recognition model: the numbers are not identity
judgements here (tests/unit/test_face_recognition.py judges identity with dlib's real model)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.graphs import DETECTOR, apply_node, id_nodes
from support.photos import ASTRONAUT, NO_FACE

CHECKPOINT = "sd15_random_full.safetensors"
OUTPUTS = ["mean_score", "frame_scores", "face_share", "stability", "plot"]


def scorer_node(pack: str = DETECTOR, id_animator: list | None = None, provider: str = "CPU") -> dict:
    inputs = {"insightface_pack": pack, "provider": provider}
    if id_animator is not None:
        inputs["id_animator"] = id_animator
    return {"class_type": "IDA_LoadFaceScorer", "inputs": inputs}


def score_node(reference: list, frames: list, scorer: list | None = None, frame_face: str = "largest") -> dict:
    return {"class_type": "FaceSimilarity", "inputs": {"reference": reference, "frames": frames,
                                                       "face_scorer": scorer or ["scorer", 0],
                                                       "frame_face": frame_face}}


def cached_output(comfy, node_id: str, index: int = 0):
    return comfy.loop.run_until_complete(comfy.executor.caches.outputs.get(node_id)).outputs[index][0]


def with_previews(graph: dict, score: str = "score") -> dict:
    """A Preview as Text per FLOAT output (the list output runs it once per frame)."""
    for index in range(4):
        graph[f"show_{OUTPUTS[index]}"] = {"class_type": "PreviewAny", "inputs": {"source": [score, index]}}
    graph["show_plot"] = {"class_type": "PreviewImage", "inputs": {"images": [score, 4]}}
    return graph


def shown(result, name: str) -> list[float]:
    return [float(text) for text in result.outputs[f"show_{name}"]["text"]]


def preview_image(comfy_base: Path, ui: dict) -> Image.Image:
    item = ui["images"][0]
    return Image.open(comfy_base / item["type"] / item["subfolder"] / item["filename"])


def test_schema_types_and_list_output(comfy):
    info = comfy.nodes.NODE_CLASS_MAPPINGS["FaceSimilarity"].GET_NODE_INFO_V1()
    required = info["input"]["required"]
    assert list(required) == ["reference", "frames", "face_scorer", "frame_face"]
    assert [required[name][0] for name in ("reference", "frames", "face_scorer")] == ["IMAGE", "IMAGE", "FACE_SCORER"]
    assert required["frame_face"][1]["options"] == ["largest", "most confident", "best match"]
    assert all(spec[1].get("tooltip") for spec in required.values())
    assert info["output"] == ["FLOAT", "FLOAT", "FLOAT", "FLOAT", "IMAGE"]
    assert info["output_name"] == OUTPUTS
    assert info["output_is_list"] == [False, True, False, False, False]
    assert info["output_node"] is True and info["category"] == "id_animator"

    loader = comfy.nodes.NODE_CLASS_MAPPINGS["IDA_LoadFaceScorer"].GET_NODE_INFO_V1()
    required, optional = loader["input"]["required"], loader["input"]["optional"]
    assert list(required) == ["insightface_pack", "provider"] and list(optional) == ["id_animator"]
    assert DETECTOR in required["insightface_pack"][1]["options"]
    assert required["provider"][1]["options"] == ["auto", "CPU", "CUDA", "ROCM", "CoreML"]
    assert required["provider"][1]["default"] == "auto"
    assert optional["id_animator"][0] == "ID_ANIMATOR"
    assert all(spec[1].get("tooltip") for spec in (*required.values(), *optional.values()))
    assert loader["output"] == ["FACE_SCORER"] and loader["output_node"] is False


def test_render_and_score_after_apply_face_adapter(comfy, comfy_base):
    """The id_score graph in small: random models render noise-like 64 px frames, so the node must
    report frames without a face (NaN scores, face share 0), not fail and not score them 0."""
    graph = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}
    graph.update(id_nodes())
    graph["apply"] = apply_node(["ckpt", 0], ["encode", 0], ["ida", 0])
    graph.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a person smiling"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 4}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["apply", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": 0, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "scorer": scorer_node(id_animator=["ida", 0]),  # as id_score: the detector is loaded once
        "score": score_node(["photo", 0], ["decode", 0]),
    })
    result = comfy.run(with_previews(graph))
    assert result.success, result.error_message
    assert cached_output(comfy, "scorer").detector is cached_output(comfy, "ida").detector
    frame_scores = shown(result, "frame_scores")
    print(f"after sampling: frame_scores {frame_scores}, face_share {shown(result, 'face_share')}")
    assert len(frame_scores) == 4  # one per frame
    (face_share,) = shown(result, "face_share")
    faces = [s for s in frame_scores if not math.isnan(s)]
    assert face_share == len(faces) / 4
    (mean,) = shown(result, "mean_score")
    assert math.isnan(mean) if not faces else mean == pytest.approx(np.mean(faces))
    assert 0 not in frame_scores  # frames without a face are NaN, never 0
    assert preview_image(comfy_base, result.outputs["score"]).size == (768, 320)  # shown on the node
    assert preview_image(comfy_base, result.outputs["show_plot"]).size == (768, 320)


def test_real_photos_as_frames_equal_the_adapter_scoring(comfy, comfy_base, model_files):
    """Frames: the reference photo, a photo without a face, the mirrored reference. The node's
    numbers equal adapter.face_recognition run here on the same pixels."""
    from id_animator.adapter import face_recognition as fr
    from id_animator.adapter.face_detection import FaceDetector

    graph = {
        "photo": {"class_type": "LoadImage", "inputs": {"image": ASTRONAUT}},
        "rocket": {"class_type": "LoadImage", "inputs": {"image": NO_FACE}},
        "flip": {"class_type": "ImageFlip", "inputs": {"image": ["photo", 0], "flip_method": "y-axis: horizontally"}},
        "two": {"class_type": "ImageBatch", "inputs": {"image1": ["photo", 0], "image2": ["rocket", 0]}},
        "frames": {"class_type": "ImageBatch", "inputs": {"image1": ["two", 0], "image2": ["flip", 0]}},
        "scorer": scorer_node(),
        "score": score_node(["photo", 0], ["frames", 0]),
    }
    result = comfy.run(with_previews(graph))
    assert result.success, result.error_message

    pack = model_files["insightface"]["models/scrfd"]
    recognizer = fr.FaceRecognizer(pack)
    detect = fr.detector_function(FaceDetector(pack))
    astronaut = np.asarray(Image.open(comfy_base / "input" / ASTRONAUT).convert("RGB"))
    reference = fr.embed_references([astronaut], detect, recognizer)
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    expected = [fr.score_frame(i, image, reference, detect, recognizer) for i, image in ((0, astronaut), (2, mirrored))]

    frame_scores = shown(result, "frame_scores")
    print(f"photos: frame_scores {frame_scores}, mean {shown(result, 'mean_score')}, "
          f"face_share {shown(result, 'face_share')}, stability {shown(result, 'stability')}")
    assert len(frame_scores) == 3 and math.isnan(frame_scores[1])
    assert frame_scores[0] == pytest.approx(1.0, abs=1e-6)  # the reference itself
    assert frame_scores[2] == pytest.approx(expected[1].similarity, abs=1e-6) and frame_scores[2] < 0.999
    assert shown(result, "face_share") == [pytest.approx(2 / 3)]
    assert shown(result, "mean_score") == [pytest.approx((frame_scores[0] + frame_scores[2]) / 2, abs=1e-6)]
    assert shown(result, "stability") == [pytest.approx(float(np.dot(expected[0].embedding, expected[1].embedding)),
                                                        abs=1e-6)]
    plot = np.asarray(preview_image(comfy_base, result.outputs["score"]).convert("RGB"))
    assert np.all(plot == (214, 39, 40), axis=2).any(), "the frame without a face is marked in red"


@pytest.fixture
def detector_only_pack(comfy_base, model_files):
    """A pack folder holding only the SCRFD detector, present while the test runs."""
    pack = comfy_base / "models" / "insightface" / "models" / "scrfd_only"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(Path(model_files["insightface"]["models/scrfd"]) / "scrfd.onnx")
    yield pack.name
    (pack / "scrfd.onnx").unlink()
    pack.rmdir()


def test_a_new_video_reuses_the_loaded_models(comfy, caplog):
    """A second queue with other frames scores them again but loads nothing: the loader's output
    comes from ComfyUI's cache (the same objects), and no recognition model is read again."""
    def loads() -> list[str]:
        return [r.message for r in caplog.records if r.message.startswith("Face recognition model")]

    caplog.set_level(logging.INFO)
    photo = {"class_type": "LoadImage", "inputs": {"image": ASTRONAUT}}
    scorer = scorer_node(provider="auto")  # inputs no other test uses: loaded by this test's first queue
    first = comfy.run(with_previews({"photo": photo, "scorer": scorer, "score": score_node(["photo", 0], ["photo", 0])}))
    assert first.success, first.error_message
    assert len(loads()) == 1, loads()
    loaded = cached_output(comfy, "scorer")

    caplog.clear()
    flipped = {"class_type": "ImageFlip", "inputs": {"image": ["photo", 0], "flip_method": "y-axis: horizontally"}}
    second = comfy.run(with_previews({"photo": photo, "flip": flipped, "scorer": scorer,
                                      "score": score_node(["photo", 0], ["flip", 0])}))
    assert second.success, second.error_message
    cached = next(d["nodes"] for e, d in second.messages if e == "execution_cached")
    assert "scorer" in cached and "score" not in cached, cached
    assert cached_output(comfy, "scorer") is loaded and not loads(), loads()
    assert shown(first, "frame_scores") == [pytest.approx(1.0, abs=1e-6)]
    assert shown(second, "frame_scores")[0] < 0.999  # the new video was scored


def test_bad_inputs_end_with_clear_messages(comfy, detector_only_pack):
    frames = {"class_type": "LoadImage", "inputs": {"image": ASTRONAUT}}
    rocket = {"class_type": "LoadImage", "inputs": {"image": NO_FACE}}

    no_face = comfy.run({"frames": frames, "rocket": rocket, "scorer": scorer_node(),
                         "score": score_node(["rocket", 0], ["frames", 0])})
    assert not no_face.success
    assert "FaceSimilarity" in no_face.error_message and "No face found in reference photo(s) 0" in no_face.error_message

    no_model = comfy.run({"frames": frames, "scorer": scorer_node(detector_only_pack),
                          "score": score_node(["frames", 0], ["frames", 0])})
    assert not no_model.success
    message = no_model.error_message
    assert message.startswith("Load Face Scorer: ")
    assert "no face recognition model" in message and "scrfd.onnx" in message and "w600k_r50.onnx" in message

    unknown = comfy.run({"frames": frames, "scorer": scorer_node("buffalo_x"),
                         "score": score_node(["frames", 0], ["frames", 0])})
    assert not unknown.success and "buffalo_x" in str(unknown.node_errors)

    node = comfy.nodes.NODE_CLASS_MAPPINGS["FaceSimilarity"]
    scorer = comfy.nodes.NODE_CLASS_MAPPINGS["IDA_LoadFaceScorer"].execute(DETECTOR, "CPU").args[0]
    photo = torch.from_numpy(np.array(Image.open(comfy.folder_paths.get_annotated_filepath(ASTRONAUT)).convert("RGB"))
                             ).float().div(255)[None]
    empty = torch.zeros((0, 64, 64, 3))
    # the pack's own error types (the pack's module, so compared by name)
    with pytest.raises(Exception, match="frames batch is empty") as frames_error:
        node.execute(photo, empty, scorer, "largest")
    assert type(frames_error.value).__name__ == "IDAnimatorError"
    with pytest.raises(Exception, match="reference batch is empty") as reference_error:
        node.execute(empty, photo, scorer, "largest")
    assert type(reference_error.value).__name__ == "NoFaceError"
