"""Reliability in real ComfyUI, in process (issue 6): bad inputs to FaceEncode, wrong files to
LoadIDAnimator, an SDXL model into ApplyFaceAdapter, and no network at run time.

Every case asserts its exact outcome: which node failed with which words, or how many crops came
out and that they are the crops the adapter core computes from the same pixels. The server side
(the server keeps working after failures, no cross-talk, interrupts) is in
test_reliability_server.py; the table of all cases is RELIABILITY.md at the repository root.
"""
from __future__ import annotations

import importlib
import ipaddress
import os
import pickle
import random
import sys
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from support.graphs import apply_node, id_nodes, sampling_graph
from support.photos import ASTRONAUT, NEWTON, NO_FACE, SOLVAY

# ----------------------------------------------------------------------------- no network

_OUTBOUND: list[str] = []  # every non-loopback connect / DNS lookup made in this test process


def _is_loopback(host: Any) -> bool:
    host = host.decode() if isinstance(host, bytes) else str(host)
    if host in ("localhost", ""):
        return True
    try:
        address = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return False  # a host name other than localhost: a DNS lookup
    return address.is_loopback or address.is_unspecified


def _record_outbound(event: str, args: tuple) -> None:
    """Audit hook (PEP 578): every Python socket connect, sendto and getaddrinfo goes through it."""
    if event in ("socket.connect", "socket.sendto"):
        address = args[1]
        if isinstance(address, tuple) and address and not _is_loopback(address[0]):
            _OUTBOUND.append(f"{event} {address!r}")
    elif event == "socket.getaddrinfo" and args[0] is not None and not _is_loopback(args[0]):
        _OUTBOUND.append(f"{event} {args[0]!r}")


# Installed when pytest collects this module, i.e. before any fixture starts ComfyUI: the hook
# sees ComfyUI's start, the pack's import and every in-process graph of the session.
if not getattr(sys, "_id_animator_outbound_hook", False):
    sys.addaudithook(_record_outbound)
    sys._id_animator_outbound_hook = True


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def pack(comfy):
    """The pack as ComfyUI loaded it (its module name is the folder path)."""
    return sys.modules[comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"].__module__.rsplit(".nodes.", 1)[0]]


@pytest.fixture(scope="module")
def detection(pack):
    return importlib.import_module(f"{pack.__name__}.adapter.face_detection")


@pytest.fixture(scope="module")
def detector(detection, comfy_base):
    """The test bed's detector pack, loaded a second time for computing the expected crops."""
    return detection.FaceDetector(comfy_base / "models" / "insightface" / "models" / "scrfd", ["CPUExecutionProvider"])


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def expected_crop(detection, detector, image: np.ndarray | torch.Tensor, mode: str = "most confident",
                  index: int = 0) -> np.ndarray:
    aligned = detection.detect_and_align(detector, image, mode, index)
    assert aligned is not None
    return aligned.crop


def received(comfy, graph: dict, prefix: str) -> torch.Tensor:
    """The IMAGE batch FaceEncode received in the last run. Expected crops are computed from it, not
    from the file: LoadImage decodes with PyAV, whose grey JPEG levels differ from PIL's by up to 2,
    enough to reorder the scores of similar faces in a group photo."""
    source = graph[f"{prefix}encode"]["inputs"]["image"][0]
    return cached_output(comfy, source)


def crops_shown(comfy_base: Path, ui: dict) -> list[np.ndarray]:
    """The aligned crops FaceEncode shows in its node (PNG previews in ComfyUI's temp folder)."""
    return [rgb(comfy_base / item["type"] / item.get("subfolder", "") / item["filename"]) for item in ui["images"]]


def assert_same_crop(shown: np.ndarray, expected: np.ndarray) -> None:
    # the preview PNG truncates 255 * (k / 255), which can land on k - 1
    assert shown.shape == expected.shape == (224, 224, 3)
    assert np.abs(shown.astype(int) - expected.astype(int)).max() <= 1


def run_ok(comfy, graph: dict) -> dict:
    result = comfy.run(graph)
    assert result.success, result.error_message
    return result.outputs


def run_error(comfy, graph: dict) -> tuple[str, str, str]:
    """(failing node id, exception type name, message) of a graph that must fail while executing."""
    result = comfy.run(graph)
    assert not result.success and result.error, result.node_errors
    error = result.error
    return error["node_id"], error["exception_type"].rsplit(".", 1)[-1], error["exception_message"]


def encode_graph(prefix: str, photo: str = ASTRONAUT, **encode_inputs) -> dict:
    graph = id_nodes(photo, prefix=prefix)
    graph[f"{prefix}encode"]["inputs"].update(encode_inputs)
    return graph


def batch_of(graph: dict, prefix: str, photos: list[str]) -> None:
    """Feed FaceEncode a batch of the photos (core ImageBatch resizes later ones to the first)."""
    previous = [f"{prefix}photo", 0]
    graph[f"{prefix}photo"]["inputs"]["image"] = photos[0]
    for i, photo in enumerate(photos[1:], 1):
        graph[f"{prefix}load{i}"] = {"class_type": "LoadImage", "inputs": {"image": photo}}
        graph[f"{prefix}batch{i}"] = {"class_type": "ImageBatch",
                                      "inputs": {"image1": previous, "image2": [f"{prefix}load{i}", 0]}}
        previous = [f"{prefix}batch{i}", 0]
    graph[f"{prefix}encode"]["inputs"]["image"] = previous


def cached_output(comfy, node_id: str, index: int = 0) -> Any:
    """One output of a node of the last graph, from ComfyUI's own output cache."""
    entry = comfy.loop.run_until_complete(comfy.executor.caches.outputs.get(node_id))
    return entry.outputs[index][0]


# ----------------------------------------------------------------------------- input files

TINY_FACE = "rel_tiny_face.png"  # the astronaut at 48 px in a 1024 px frame: face ~15 px
CARTOON = "rel_cartoon.png"  # a drawn smiley
ONE_PIXEL = "rel_1x1.png"
GREY, RGBA, SIXTEEN_BIT = "rel_grey.png", "rel_rgba.png", "rel_16bit.png"
NAN_LATENT = "rel_nan.latent"


def cartoon_face() -> np.ndarray:
    image = np.full((512, 512, 3), 235, np.uint8)
    cv2.circle(image, (256, 256), 170, (255, 205, 120), -1)
    cv2.circle(image, (256, 256), 170, (40, 40, 40), 4)
    for x in (195, 317):
        cv2.circle(image, (x, 215), 22, (255, 255, 255), -1)
        cv2.circle(image, (x + 5, 220), 10, (20, 20, 20), -1)
    cv2.ellipse(image, (256, 300), (70, 40), 0, 20, 160, (120, 30, 30), 6)
    cv2.line(image, (256, 240), (246, 280), (120, 80, 40), 4)
    return image


@pytest.fixture(scope="module")
def inputs(comfy_base) -> dict[str, np.ndarray]:
    """Odd photos written into ComfyUI's input folder; returns the RGB pixels they hold."""
    folder = comfy_base / "input"
    astronaut = rgb(folder / ASTRONAUT)
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    tiny = np.full((1024, 1024, 3), 128, np.uint8)
    tiny[500:548, 500:548] = cv2.resize(astronaut, (48, 48), interpolation=cv2.INTER_AREA)
    Image.fromarray(tiny).save(folder / TINY_FACE)
    Image.fromarray(cartoon_face()).save(folder / CARTOON)
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(folder / ONE_PIXEL)
    Image.fromarray(grey).save(folder / GREY)  # mode L
    alpha = np.random.default_rng(0).integers(0, 256, astronaut.shape[:2] + (1,), dtype=np.uint8)
    Image.fromarray(np.concatenate([astronaut, alpha], axis=2)).save(folder / RGBA)
    cv2.imwrite(str(folder / SIXTEEN_BIT), astronaut[:, :, ::-1].astype(np.uint16) * 257)  # 16-bit RGB PNG
    write_nan_latent(comfy_base)
    return {"astronaut": astronaut, "grey": np.repeat(grey[:, :, None], 3, axis=2),
            "solvay": rgb(folder / SOLVAY), "newton": rgb(folder / NEWTON)}


# ----------------------------------------------------------------------------- bad inputs

NO_FACE_HINT = "no face found in image(s) {} of {} (0-based)"


def write_nan_latent(comfy_base: Path) -> None:
    """The input behind `nan_image_graph` (a missing file would only drop that branch's output)."""
    save_file({"latent_tensor": torch.full((1, 3, 64, 64), float("nan"))}, str(comfy_base / "input" / NAN_LATENT))


def nan_image_graph(prefix: str) -> dict:
    """An IMAGE full of NaN from core nodes: a NaN latent decoded by the pixel-space VAE."""
    graph = encode_graph(prefix)
    graph[f"{prefix}latent"] = {"class_type": "LoadLatent", "inputs": {"latent": NAN_LATENT}}
    graph[f"{prefix}vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    graph[f"{prefix}decode"] = {"class_type": "VAEDecode",
                                "inputs": {"samples": [f"{prefix}latent", 0], "vae": [f"{prefix}vae", 0]}}
    graph[f"{prefix}encode"]["inputs"]["image"] = [f"{prefix}decode", 0]
    return graph


def mixed_batch_graph(prefix: str, on_no_face: str) -> dict:
    graph = encode_graph(prefix, on_no_face=on_no_face)
    batch_of(graph, prefix, [NEWTON, NO_FACE])
    return graph


FAILING_INPUTS: dict[str, tuple[Callable[[str], dict], str, list[str]]] = {
    # case: (graph, exception type, words in the message)
    "face smaller than the detector finds": (
        lambda p: encode_graph(p, TINY_FACE), "NoFaceError", [NO_FACE_HINT.format(0, 1), "skip image"]),
    "cartoon drawing": (lambda p: encode_graph(p, CARTOON), "NoFaceError", [NO_FACE_HINT.format(0, 1)]),
    "1x1 image": (lambda p: encode_graph(p, ONE_PIXEL), "NoFaceError", [NO_FACE_HINT.format(0, 1)]),
    "face index past the last face": (
        lambda p: encode_graph(p, SOLVAY, face_select="index", face_index=29), "IDAnimatorError",
        ["Face index 29 is out of range: 29 face(s) found", "must be 0..28", "0 = leftmost"]),
    "batch with a photo without face, on_no_face error": (
        lambda p: mixed_batch_graph(p, "error"), "NoFaceError", [NO_FACE_HINT.format(1, 2), "skip image"]),
    "NaN IMAGE from core nodes": (nan_image_graph, "IDAnimatorError", ["NaN or infinite", "check the node"]),
}


@pytest.mark.parametrize("case", FAILING_INPUTS)
def test_bad_input_fails_in_face_encode_with_its_message(comfy, inputs, case):
    make_graph, error_type, words = FAILING_INPUTS[case]
    prefix = f"bad{list(FAILING_INPUTS).index(case)}_"
    node, kind, message = run_error(comfy, make_graph(prefix))
    assert (node, kind) == (f"{prefix}encode", error_type), message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("face_select, face_index", [("most confident", 0), ("largest", 0), ("index", 28)])
def test_group_photo_gives_the_selected_face(comfy, comfy_base, inputs, detection, detector, face_select,
                                             face_index):
    prefix = f"group_{face_select[0]}_"
    graph = encode_graph(prefix, SOLVAY, face_select=face_select, face_index=face_index)
    [shown] = crops_shown(comfy_base, run_ok(comfy, graph)[f"{prefix}encode"])
    [photo] = received(comfy, graph, prefix)
    assert_same_crop(shown, expected_crop(detection, detector, photo, face_select, face_index))


def test_grey_rgba_and_16_bit_files_give_the_8_bit_colour_crops(comfy, comfy_base, inputs, detection, detector):
    """LoadImage turns them into RGB floats; alpha is dropped and 16-bit rounds to the same 8-bit crop."""
    graph = encode_graph("formats_")
    batch_of(graph, "formats_", [GREY, RGBA, SIXTEEN_BIT])
    grey, rgba, sixteen = crops_shown(comfy_base, run_ok(comfy, graph)["formats_encode"])
    photos = received(comfy, graph, "formats_")
    assert photos.shape == (3, 512, 512, 3) and torch.equal(photos[0, ..., 0], photos[0, ..., 2])
    assert_same_crop(grey, expected_crop(detection, detector, photos[0]))
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    colour = expected_crop(detection, detector, inputs["astronaut"])  # from the 8-bit RGB pixels
    assert_same_crop(rgba, colour)
    assert_same_crop(sixteen, colour)


@pytest.fixture(scope="module")
def identity_run(comfy, inputs) -> dict[str, Any]:
    """One identity video from a batch (Newton's painted portrait, a rocket) with skip image: FaceEncode
    -> ApplyFaceAdapter -> KSampler. Its ID_ANIMATOR and FACE_EMBEDS serve the direct calls below."""
    graph = mixed_batch_graph("skip_", "skip image")
    graph.update(sampling_graph(frames=2, steps=1, model=["skip_apply", 0], prefix="rel_identity"))
    graph["skip_apply"] = apply_node(["unet", 0], ["skip_encode", 0], ["skip_ida", 0])
    outputs = run_ok(comfy, graph)
    return {"outputs": outputs, "photos": received(comfy, graph, "skip_"),
            "id_animator": cached_output(comfy, "skip_ida"), "embeds": cached_output(comfy, "skip_encode")}


def test_batch_with_skip_image_encodes_only_the_painted_face(comfy_base, identity_run, detection, detector):
    [shown] = crops_shown(comfy_base, identity_run["outputs"]["skip_encode"])
    newton, rocket = identity_run["photos"]
    assert detection.detect_and_align(detector, rocket) is None
    assert_same_crop(shown, expected_crop(detection, detector, newton))
    assert identity_run["outputs"]["save"]["latents"]


def test_8000_px_photo_is_detected_downscaled_without_a_memory_blow_up(comfy, comfy_base, inputs, detection,
                                                                      detector, monkeypatch):
    side = 8000
    image_bytes = side * side * 3 * 4  # the float32 IMAGE: 768 MB
    detected_shapes: list[tuple[int, ...]] = []
    detect = detection.FaceDetector.detect

    def recording_detect(self, image_rgb, det_size=640):
        detected_shapes.append(tuple(image_rgb.shape))
        return detect(self, image_rgb, det_size)

    monkeypatch.setattr(detection.FaceDetector, "detect", recording_detect)
    graph = encode_graph("huge_")
    graph["huge_scale"] = {"class_type": "ImageScale", "inputs": {
        "image": ["huge_photo", 0], "upscale_method": "nearest-exact", "width": side, "height": side, "crop": "disabled"}}
    graph["huge_encode"]["inputs"]["image"] = ["huge_scale", 0]
    tracemalloc.start()  # numpy's buffers are traced; torch's (the IMAGE itself) are not
    try:
        outputs = run_ok(comfy, graph)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    [shown] = crops_shown(comfy_base, outputs["huge_encode"])
    assert detected_shapes and all(max(shape[:2]) <= detection.MAX_DETECT_SIDE for shape in detected_shapes)
    # the uint8 copy is a quarter of the IMAGE; a float copy or full-size detection would pass 1x
    assert peak < 0.5 * image_bytes, f"numpy peak {peak / 2**20:.0f} MiB for a {image_bytes / 2**20:.0f} MiB IMAGE"
    small = expected_crop(detection, detector, inputs["astronaut"])
    other = expected_crop(detection, detector, inputs["newton"])
    difference = np.abs(shown.astype(float) - small).mean()
    assert difference < 0.25 * np.abs(other.astype(float) - small).mean(), difference


# --- tensors no core node makes: FaceEncode.execute called directly with ComfyUI's own objects ---


@pytest.mark.parametrize("case, make, error_type, words", [
    ("inf", lambda: torch.full((1, 64, 64, 3), float("inf")), "IDAnimatorError", ["NaN or infinite"]),
    ("empty batch", lambda: torch.zeros(0, 64, 64, 3), "NoFaceError", ["empty image batch"]),
    ("0-255 floats", lambda: torch.full((1, 64, 64, 3), 200.0), "IDAnimatorError", ["expected ComfyUI's [0, 1]"]),
    ("bfloat16 photo without a face", lambda: torch.rand(1, 64, 64, 3).to(torch.bfloat16), "NoFaceError",
     [NO_FACE_HINT.format(0, 1)]),
])
def test_direct_tensor_inputs_raise_our_errors(comfy, identity_run, case, make, error_type, words):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["FaceEncode"]
    with pytest.raises(Exception) as info:
        node.execute(identity_run["id_animator"], make(), "most confident", 0, "error")
    assert type(info.value).__name__ == error_type, repr(info.value)
    for word in words:
        assert word in str(info.value)


def sdxl_model():
    """ComfyUI's own SDXL model class on the meta device (no weights: a real SDXL UNet is 5 GB)."""
    import comfy.model_detection
    import comfy.model_patcher

    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "dtype": torch.float16,
              "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2],
              "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4], "transformer_depth_middle": 10,
              "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
              "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
              "use_temporal_resblock": False}
    model_config = comfy.model_detection.model_config_from_unet_config(config)
    assert type(model_config).__name__ == "SDXL"
    model = model_config.get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_sdxl_model_into_apply_face_adapter_is_refused(comfy, identity_run):
    apply = comfy.nodes.NODE_CLASS_MAPPINGS["ApplyFaceAdapter"]
    with pytest.raises(Exception) as info:
        apply.execute(sdxl_model(), identity_run["id_animator"], identity_run["embeds"], 0.8, 0.0, 1.0, 1.0)
    message = str(info.value)
    assert type(info.value).__name__ == "IDAnimatorError"
    assert "MODEL (SDXL)" in message and "SD1.5" in message and "768" in message


# ----------------------------------------------------------------------------- wrong files

class CodeOnUnpickle:
    """Unpickling this object runs a shell command that creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def _ip_adapter_layers(context: int, faceid: bool) -> dict[str, torch.Tensor]:
    layers = {}
    for index, width in ((1, 320), (3, 320), (5, 640), (31, 1280)):
        layers[f"{index}.to_k_ip.weight"] = _zeros(width, context)
        layers[f"{index}.to_v_ip.weight"] = _zeros(width, context)
        if faceid:
            layers[f"{index}.to_q_lora.down.weight"] = _zeros(128, width)
    return layers


@dataclass(frozen=True)
class WrongFile:
    """A file a user might drop into a model folder, and the words its error must contain."""

    folder: str  # models/<folder>/
    make: Callable[[Path, Path, Path], None]  # (path, good animator.ckpt, marker)
    words: tuple[str, ...]


def _torch_save(state: Any, legacy: bool = False) -> Callable[[Path, Path, Path], None]:
    return lambda path, good, marker: torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def _malicious(legacy: bool) -> Callable[[Path, Path, Path], None]:
    def make(path: Path, good: Path, marker: Path) -> None:
        state = {"state_dict": {"image_proj_model.latents": _zeros(1, 16, 768)}, "extra": CodeOnUnpickle(marker)}
        torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return make


WRONG_FILES: dict[str, WrongFile] = {
    "rel_ip-adapter-faceid_sd15.bin": WrongFile("id_animator", _torch_save(
        {"image_proj": {"proj.0.weight": _zeros(1024, 512), "norm.weight": _zeros(768)},
         "ip_adapter": _ip_adapter_layers(768, faceid=True)}), ("IP-Adapter FaceID", "SD1.5", "models/ipadapter/")),
    "rel_ip-adapter-plus_sdxl_vit-h.safetensors": WrongFile("id_animator", lambda path, good, marker: save_file(
        {"image_proj.latents": _zeros(1, 16, 1280), "image_proj.proj_out.weight": _zeros(2048, 1280),
         **{f"ip_adapter.{k}": v for k, v in _ip_adapter_layers(2048, faceid=False).items()}}, str(path)),
        ("IP-Adapter Plus file for SDXL",)),
    "rel_id_animator_sdxl.ckpt": WrongFile("id_animator", _torch_save(
        {"state_dict": {f"adapter_modules.{i}.to_k_face.weight": _zeros(w, 2048)
                        for i, w in ((1, 640), (69, 1280), (139, 1280))}}), ("SDXL", "SD1.5")),
    "rel_mm_sd_v15_v2.ckpt": WrongFile("id_animator", _torch_save(
        {f"down_blocks.0.motion_modules.{m}.temporal_transformer.proj_in.weight": _zeros(320, 320) for m in range(2)}),
        ("AnimateDiff motion module", "models/animatediff_models/")),
    "rel_truncated_animator.ckpt": WrongFile(
        "id_animator", lambda path, good, marker: path.write_bytes(good.read_bytes()[: good.stat().st_size // 2]),
        ("truncated", "re-download")),
    "rel_empty_animator.ckpt": WrongFile("id_animator", lambda path, good, marker: path.write_bytes(b""), ("empty",)),
    "rel_random_animator.bin": WrongFile(
        "id_animator", lambda path, good, marker: path.write_bytes(b"\x13\x37" + random.Random(0).randbytes(65536)),
        ("neither a safetensors file nor a PyTorch checkpoint",)),
    "rel_evil_animator.ckpt": WrongFile("id_animator", _malicious(legacy=False), ("NOT loaded", "code", "system")),
    "rel_evil_animator_legacy.pt": WrongFile("id_animator", _malicious(legacy=True), ("NOT loaded", "code")),
    "rel_CLIP-ViT-bigG-14.safetensors": WrongFile("clip_vision", lambda path, good, marker: save_file(
        {"vision_model.encoder.layers.47.layer_norm1.weight": torch.ones(1664),
         "vision_model.embeddings.class_embedding": torch.zeros(1664)}, str(path)), ("ViT-bigG/14", "ViT-H/14")),
    "rel_evil_clip_vision.bin": WrongFile("clip_vision", _malicious(legacy=True), ("NOT loaded", "code")),
    "rel_junk_clip_vision.safetensors": WrongFile(
        "clip_vision", lambda path, good, marker: path.write_bytes(random.Random(1).randbytes(4096)),
        ("neither a safetensors file nor a PyTorch checkpoint",)),
}
RENAMED_PICKLE = "rel_animator_renamed.safetensors"  # a good animator.ckpt (a torch zip) named .safetensors


def write_wrong_files(comfy_base: Path) -> Path:
    """Write every WRONG_FILES entry and RENAMED_PICKLE (once); returns the marker path."""
    models = comfy_base / "models"
    good = models / "id_animator" / "animator.ckpt"
    marker = comfy_base / "PICKLE_CODE_RAN"
    for name, wrong in WRONG_FILES.items():
        path = models / wrong.folder / name
        if not path.exists():
            wrong.make(path, good, marker)
    renamed = models / "id_animator" / RENAMED_PICKLE
    if not renamed.exists():
        renamed.write_bytes(good.read_bytes())
    return marker


@pytest.fixture(scope="module")
def wrong_files(comfy, comfy_base) -> Path:
    marker = write_wrong_files(comfy_base)
    comfy.folder_paths.filename_list_cache.clear()
    return marker


def test_malicious_pickles_are_live(comfy_base, wrong_files):
    """The payloads work: an unrestricted torch.load runs them (so the refusals below mean something)."""
    for name in ("rel_evil_animator.ckpt", "rel_evil_clip_vision.bin"):
        path = comfy_base / "models" / WRONG_FILES[name].folder / name
        torch.load(path, weights_only=False)
        assert wrong_files.exists()
        wrong_files.unlink()


@pytest.mark.parametrize("name", WRONG_FILES)
def test_wrong_file_is_named_and_nothing_runs(comfy, wrong_files, name):
    wrong = WRONG_FILES[name]
    graph = id_nodes(NO_FACE, prefix="wrong_")
    field = "adapter_name" if wrong.folder == "id_animator" else "clip_vision_name"
    graph["wrong_ida"]["inputs"][field] = name
    node, kind, message = run_error(comfy, graph)
    assert not wrong_files.exists(), "code in a pickle ran"
    assert (node, kind) == ("wrong_ida", "CheckpointError"), message
    for word in wrong.words + (name,):
        assert word in message, (word, message)
    expected = (("Expected animator.ckpt", "huggingface.co/spaces/ID-Animator") if wrong.folder == "id_animator"
                else ("CLIP-ViT-H-14-laion2B-s32B-b79K",))  # what goes there (not in any test file name)
    for word in expected:
        assert word in message, (word, message)


def test_renamed_pickle_is_read_safely_with_a_warning(comfy, wrong_files, caplog):
    """Decision: a torch checkpoint named .safetensors is read by its real format, with weights_only."""
    graph = id_nodes(NO_FACE, prefix="renamed_")
    graph["renamed_ida"]["inputs"]["adapter_name"] = RENAMED_PICKLE
    with caplog.at_level("WARNING"):
        node, kind, message = run_error(comfy, graph)
    assert (node, kind) == ("renamed_encode", "NoFaceError"), message  # the loader accepted it
    assert "named .safetensors but really" in caplog.text


# ----------------------------------------------------------------------------- no network

def test_no_socket_leaves_the_machine(identity_run):
    """The audit hook has watched this process since collection: ComfyUI's start, the pack's import,
    fresh loader runs (the wrong-file and renamed-file cases load afresh), FaceEncode, an identity
    video (identity_run) and every other in-process graph of the session."""
    assert identity_run["outputs"]["save"]["latents"]
    assert _OUTBOUND == [], _OUTBOUND
