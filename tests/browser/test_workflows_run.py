"""Every shipped workflow runs end to end as a user runs it: the file dropped on the real frontend,
turned into a prompt by the frontend itself (`app.graphToPrompt`), shrunk for the CPU (tiny
latents, few frames (the long videos' context windows with them), two steps; nothing else changed)
and executed by real ComfyUI with the real AnimateDiff-Evolved and Advanced-ControlNet at the
pinned commits, on full-size random weights under the file names the workflows use. Each must
write its video or image.

Skips, saying how to provide them, when the third-party packs cannot be had (support/packs.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import models, packs, photos, workflow_bed
from support.harness import make_base, serving
from support.workflow_bed import make_workflows, workflow_spec

REPO = Path(__file__).resolve().parents[2]

DROP = """async ([name, text]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], name, {type: 'application/json'}));
    const canvas = document.querySelector('#graph-canvas, canvas.graph-canvas');
    const box = canvas.getBoundingClientRect();
    for (const type of ['dragenter', 'dragover', 'drop']) {
        canvas.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true,
                                                  clientX: box.x + box.width / 2, clientY: box.y + box.height / 2}));
    }
}"""


@pytest.fixture(scope="module")
def browser_base(chromium, tmp_path_factory, cache_dir, comfyui_dir, scrfd_dir) -> Path:
    """The browser suite's base plus AnimateDiff-Evolved and Advanced-ControlNet (overrides conftest's)."""
    checkouts = packs.pack_checkouts(cache_dir)
    model_files = models.ensure_models(cache_dir, comfyui_dir, scrfd_dir)
    base = make_base(tmp_path_factory.mktemp("run-base"), REPO, model_files)
    packs.install(base / "custom_nodes", checkouts)
    photos.write_inputs(base / "input", scrfd_dir)
    workflow_bed.add_workflow_files(base, model_files, cache_dir)
    return base


@pytest.fixture(scope="module")
def browser_server(comfyui_dir, browser_base, artifacts, request):
    """With the UNet (and so the motion modules) held in bf16, as `--bf16-unet` users run it: on the
    CPU ComfyUI still computes in fp32, and the whole test command stays within 12 GB."""
    with serving(comfyui_dir, browser_base, lambda: request.session.testsfailed, artifacts / "comfyui-run.log",
                 extra_args=("--bf16-unet",)) as server:
        yield server


@pytest.fixture(scope="module")
def server_models(browser_server) -> set[str]:
    """The model files the server may hold: those of the workflows it ran since its last /free."""
    return set()


def workflow_models(name: str) -> set[str]:
    """The model files (and the detector pack) a shipped workflow names."""
    return {f for f in workflow_bed.spec(name).files() if f in workflow_spec.MODELS}


def model_sharing_order(names: list[str]) -> list[str]:
    """The workflows in an order that loads models as few times as it can: after the one with the
    most models, every workflow whose models are already loaded, then the next largest set."""
    left, order = list(names), []
    while left:
        largest = max(left, key=lambda n: len(workflow_models(n)))
        ready = [largest] + [n for n in left if n != largest and workflow_models(n) <= workflow_models(largest)]
        order += ready
        left = [n for n in left if n not in ready]
    return order


NAMES = model_sharing_order(workflow_bed.workflow_names())


def next_workflow(request) -> str | None:
    """The workflow the next test of this session runs, if the next test runs one."""
    items = request.session.items
    position = items.index(request.node)
    following = items[position + 1] if position + 1 < len(items) else None
    if following is None or following.originalname != request.node.originalname:
        return None
    return following.callspec.params["name"]


def test_third_party_table_matches_the_real_packs(browser_server):
    """The pinned table the workflow files were written from equals what the packs really define."""
    problems = make_workflows.third_party_mismatches(browser_server.get("/object_info"))
    assert not problems, problems


def drop_and_convert(page, name: str) -> dict:
    """Drop workflows/<name>.json on the canvas as a user does; returns the frontend's API prompt."""
    from workflow_browser import close_dialogs, error_report

    text = (make_workflows.WORKFLOW_DIR / f"{name}.json").read_text()
    expected_nodes = len(json.loads(text)["nodes"])
    page.evaluate("() => app.graph.clear()")
    seen = len(page.messages)
    page.evaluate(DROP, [f"{name}.json", text])
    page.wait_for_function("(count) => app.graph.nodes.length === count", arg=expected_nodes, timeout=30_000)
    page.wait_for_timeout(500)
    close_dialogs(page)
    assert page.messages[seen:] == [], f"{name}: the frontend reported errors while loading"
    missing = page.evaluate("() => app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert missing == [], f"{name}: nodes the frontend does not know: {missing}"
    report = error_report(page)
    assert report == "", f"{name}: the frontend reports missing packs, models or inputs:\n{report}"
    return page.evaluate("async () => (await app.graphToPrompt()).output")


def saved_files(history: dict, prompt: dict, base: Path) -> list[Path]:
    out = []
    for node_id, node in prompt.items():
        if node["class_type"] in ("SaveVideo", "SaveImage"):
            for item in history["outputs"].get(node_id, {}).get("images", []):
                out.append(base / "output" / item["subfolder"] / item["filename"])
    return out


def frames_and_size(path: Path) -> tuple[int, tuple[int, int]]:
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return len(frames), (frames[0].shape[1], frames[0].shape[0])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_end_to_end(page, browser_server, server_models, browser_base, artifacts, request, name):
    prompt = drop_and_convert(page, name)
    changed = workflow_bed.shrink(name, prompt)
    shipped_types = {n["type"] for n in workflow_bed.load(name)["nodes"]} - workflow_bed.ui_format.FRONTEND_ONLY
    assert {n["class_type"] for n in prompt.values()} == shipped_types
    assert workflow_bed.spec(name).node_types() & set(workflow_spec.THIRD_PARTY) <= shipped_types

    server_models |= workflow_models(name)
    try:
        history = browser_server.run(prompt, timeout=900)
    finally:
        # One workflow's models at a time: before a workflow that needs a model this one did not
        # load, the server unloads them and drops its cache (now, seconds before the next test
        # queues, so that the server has done it), and the suite's peak is one workflow's, not
        # eight's. The next workflow on the same models (most share the checkpoint, the adapter
        # bundle and the motion module) reuses them, as a user's second run does.
        coming = next_workflow(request)
        if coming is None or not workflow_models(coming) <= server_models:
            browser_server.post("/free", {"unload_models": True, "free_memory": True})
            server_models.clear()
    assert history["status"]["status_str"] == "success", (changed, json.dumps(history["status"])[-3000:])
    files = saved_files(history, prompt, browser_base)
    assert len(files) == 1 and files[0].is_file(), (files, history["outputs"])
    frames = workflow_bed.ci_output_frames(name)
    size = (workflow_bed.CI_SIZE, workflow_bed.CI_SIZE)
    if files[0].suffix == ".png":
        from PIL import Image

        assert frames == 1 and Image.open(files[0]).size == size
    else:
        assert frames_and_size(files[0]) == (frames, size), files[0]
    for node_id, node in prompt.items():
        if node["class_type"] == "FaceSimilarity":  # id_score, unianimate_*: the frames' scores, plotted
            assert history["outputs"][node_id]["images"], history["outputs"].get(node_id)
        if node["class_type"] == "UniAnimateContextWindows":  # unianimate_long: the windows slid
            assert f"Context window 2/2: frames 2-5 of {frames}" in browser_server.log(), browser_server.log()[-3000:]
        if node["class_type"] == "ADE_StandardUniformContextOptions":  # id_long_video: AnimateDiff's windows slid
            assert (f"Sliding context window sampling activated - latents passed in ({frames}) greater than "
                    f"context_length {workflow_bed.CI_WINDOW['context_length']}") in browser_server.log(), \
                browser_server.log()[-3000:]
    page.screenshot(path=str(artifacts / f"run_{name}.png"))
