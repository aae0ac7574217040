"""The server keeps working (issue 6), over HTTP against ComfyUI's own `main.py --cpu`.

One queue holds 20 valid identity videos (two faces x two weights, alternating) with a failing
prompt after most of them: wrong adapter files, a pickle that tries to run code, a wrong CLIP
vision, a photo without a face, a NaN image, a face index out of range. Every valid prompt must
equal its own single-run result (no cross-talk through caches or shared patches), every failing
one must fail with its message; a prompt refused by validation does not disturb the queue. Then a
run is interrupted mid-sampling, and the next runs, patched and unpatched, still give their
original outputs. Each valid prompt is checked to have really sampled (not come from the cache).
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from support.graphs import apply_node, id_nodes, sampling_graph, saved_latent
from support.photos import ASTRONAUT, NEWTON, NO_FACE, SOLVAY
from test_reliability import NAN_LATENT, write_nan_latent, write_wrong_files

FACES = {"a": ASTRONAUT, "b": NEWTON}
CONFIGS = [("a", 0.5), ("b", 1.0), ("a", 1.0), ("b", 0.5)]  # consecutive prompts always change face
BURST = 20


def identity_graph(face: str, weight: float, seed: int = 0, steps: int = 1, save: str = "rel_http") -> dict:
    """The user's graph: both identities encoded (cached after the first run), `face` applied."""
    graph = sampling_graph(frames=2, size=64, steps=steps, seed=seed, model=["apply", 0], prefix=save)
    graph.update(id_nodes(FACES["a"], prefix="a_"))
    graph.update(id_nodes(FACES["b"], prefix="b_"))
    del graph["b_ida"]
    graph["b_encode"]["inputs"]["id_animator"] = ["a_ida", 0]
    graph["apply"] = apply_node(["unet", 0], [f"{face}_encode", 0], ["a_ida", 0], weight=weight)
    return graph


def plain_graph() -> dict:
    return sampling_graph(frames=2, size=64, steps=1, prefix="rel_http_plain")


def with_failing_branch(graph: dict, branch: dict) -> dict:
    """The same graph, its SaveLatent removed, plus a broken branch: how a user's graph fails."""
    failing = {k: v for k, v in graph.items() if k != "save"}
    failing.update(branch)
    return failing


def loader_branch(field: str, name: str) -> dict:
    branch = id_nodes(NO_FACE, prefix="x_")
    branch["x_ida"]["inputs"][field] = name
    return branch


def encode_branch(photo: str = NO_FACE, **encode_inputs) -> dict:
    branch = id_nodes(photo, prefix="x_")
    del branch["x_ida"]
    branch["x_encode"]["inputs"].update(id_animator=["a_ida", 0], **encode_inputs)
    return branch


def nan_branch() -> dict:
    branch = encode_branch()
    branch["x_latent"] = {"class_type": "LoadLatent", "inputs": {"latent": NAN_LATENT}}
    branch["x_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}}
    branch["x_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["x_latent", 0], "vae": ["x_vae", 0]}}
    branch["x_encode"]["inputs"]["image"] = ["x_decode", 0]
    return branch


FAILURES: list[tuple[str, Callable[[], dict], str, list[str]]] = [
    # (case, broken branch, failing node, words in the message)
    ("IP-Adapter FaceID file", lambda: loader_branch("adapter_name", "rel_ip-adapter-faceid_sd15.bin"),
     "x_ida", ["IP-Adapter FaceID", "animator.ckpt"]),
    ("pickle that runs code", lambda: loader_branch("adapter_name", "rel_evil_animator.ckpt"),
     "x_ida", ["NOT loaded", "system"]),
    ("truncated download", lambda: loader_branch("adapter_name", "rel_truncated_animator.ckpt"),
     "x_ida", ["truncated", "re-download"]),
    ("ViT-bigG clip vision", lambda: loader_branch("clip_vision_name", "rel_CLIP-ViT-bigG-14.safetensors"),
     "x_ida", ["ViT-bigG/14", "ViT-H/14"]),
    ("clip vision pickle that runs code", lambda: loader_branch("clip_vision_name", "rel_evil_clip_vision.bin"),
     "x_ida", ["NOT loaded", "ViT-H/14"]),
    ("photo without a face", encode_branch, "x_encode", ["no face found in image(s) 0 of 1"]),
    ("NaN image", nan_branch, "x_encode", ["NaN or infinite"]),
    ("face index out of range", lambda: encode_branch(SOLVAY, face_select="index", face_index=40),
     "x_encode", ["Face index 40 is out of range"]),
]


# ----------------------------------------------------------------------------- HTTP helpers

def status_messages(history: dict) -> dict[str, dict]:
    return {event: data for event, data in history["status"].get("messages", [])}


def executed_fresh(history: dict, node: str) -> bool:
    """The node really ran in this prompt (it is not among the cached ones)."""
    cached = status_messages(history).get("execution_cached", {}).get("nodes", [])
    return node not in cached


def latent(comfy_base: Path, history: dict) -> torch.Tensor:
    assert history["status"]["status_str"] == "success", json.dumps(history["status"])[:3000]
    return saved_latent(comfy_base / "output", history["outputs"]["save"])


def run_sampled(http_comfy, comfy_base: Path, graph: dict) -> torch.Tensor:
    history = http_comfy.run(graph)
    assert executed_fresh(history, "sampler"), "the sampler result came from the cache"
    return latent(comfy_base, history)


@pytest.fixture(scope="module")
def wrong_files(comfy_base) -> Path:
    write_nan_latent(comfy_base)
    return write_wrong_files(comfy_base)


@pytest.fixture(scope="module")
def references(http_comfy, comfy_base, wrong_files) -> dict[Any, torch.Tensor]:
    """Single-run results, each prompt alone in the queue: the unpatched model and every config."""
    refs = {"plain": run_sampled(http_comfy, comfy_base, plain_graph())}
    for face, weight in CONFIGS:
        refs[face, weight] = run_sampled(http_comfy, comfy_base, identity_graph(face, weight))
    assert not torch.equal(refs["a", 0.5], refs["b", 0.5]) and not torch.equal(refs["a", 0.5], refs["a", 1.0])
    return refs


# ----------------------------------------------------------------------------- tests

def test_refused_prompt_names_the_missing_file(http_comfy, references):
    graph = identity_graph("a", 0.5)
    graph["a_ida"]["inputs"]["adapter_name"] = "not_downloaded_animator.ckpt"
    reply = http_comfy.post("/prompt", {"prompt": graph, "client_id": "tests"})
    assert reply.get("http_status") == 400 and "prompt_id" not in reply
    assert "not_downloaded_animator.ckpt" in json.dumps(reply) and "id_animator" in json.dumps(reply)


def test_queue_of_valid_and_failing_prompts(http_comfy, comfy_base, references, wrong_files):
    queued: list[tuple[str, Any]] = []  # (prompt id, config or failure index)
    for i in range(BURST):
        face, weight = CONFIGS[i % len(CONFIGS)]
        graph = identity_graph(face, weight)
        queued.append((http_comfy.queue(graph), (face, weight)))
        if i < len(FAILURES):
            queued.append((http_comfy.queue(with_failing_branch(graph, FAILURES[i][1]())), i))
    for prompt_id, expected in queued:
        history = http_comfy.wait(prompt_id, timeout=900)
        if isinstance(expected, int):
            case, _, node, words = FAILURES[expected]
            assert history["status"]["status_str"] == "error", case
            error = status_messages(history)["execution_error"]
            assert error["node_id"] == node, (case, error["node_id"], error["exception_message"])
            for word in words:
                assert word in error["exception_message"], (case, word, error["exception_message"])
        else:
            assert executed_fresh(history, "sampler"), expected
            assert torch.equal(latent(comfy_base, history), references[expected]), expected
    assert not wrong_files.exists(), "code in a pickle ran in the server"


def test_interrupt_mid_sampling_then_everything_runs_as_before(http_comfy, comfy_base, references):
    import websocket

    client = uuid.uuid4().hex
    socket = websocket.create_connection(f"ws://127.0.0.1:{http_comfy.port}/ws?clientId={client}", timeout=600)
    long_run = identity_graph("b", 1.0, seed=99, steps=40)
    reply = http_comfy.post("/prompt", {"prompt": long_run, "client_id": client})
    prompt_id = reply["prompt_id"]
    steps_seen = wait_for_sampling(socket, prompt_id)
    socket.close()
    http_comfy.post("/interrupt", {"prompt_id": prompt_id})
    history = http_comfy.wait(prompt_id, timeout=900)
    messages = status_messages(history)
    assert "execution_interrupted" in messages and "execution_success" not in messages
    assert messages["execution_interrupted"]["node_id"] == "sampler" and 1 <= steps_seen < 40
    # the interrupted model was LoRA-patched: the next runs, patched and unpatched, are unchanged
    assert torch.equal(run_sampled(http_comfy, comfy_base, identity_graph("b", 1.0)), references["b", 1.0])
    assert torch.equal(run_sampled(http_comfy, comfy_base, plain_graph()), references["plain"])
    assert torch.equal(run_sampled(http_comfy, comfy_base, identity_graph("a", 0.5)), references["a", 0.5])


def wait_for_sampling(socket, prompt_id: str, timeout: float = 600) -> int:
    """Read the websocket until the sampler of `prompt_id` reports its first finished step."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        message = socket.recv()
        if not isinstance(message, str):
            continue  # binary preview frames
        event = json.loads(message)
        data = event.get("data", {})
        if event.get("type") == "progress" and data.get("prompt_id") == prompt_id and data.get("node") == "sampler":
            if data["value"] >= 1:
                return int(data["value"])
        if event.get("type") in ("execution_error", "execution_success") and data.get("prompt_id") == prompt_id:
            raise AssertionError(f"the long run ended before it could be interrupted: {event}")
    raise TimeoutError("no sampling progress over the websocket")
