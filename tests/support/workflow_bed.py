"""The shipped workflows and their test bed.

`add_workflow_files` gives a ComfyUI base folder every model and input file the workflows name,
as links to the generated full-size random models (motion modules and ControlNets included,
generated under the workflows' own file names; the UniAnimate UNet at reduced width and the
DWPose files from their own generators) and public-domain photos, so that the workflows load
without missing-file marks and run as shipped, only shrunk (`shrink`). The UniAnimate dance video is the astronaut
photo sliding sideways: the random DWPose stand-ins find a person with shoulders and hips in it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from support import photos
from support.dwpose_models import dwpose_files
from support.unianimate_files import REDUCED, ensure_unianimate_file

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import make_workflows
import ui_format  # noqa: F401,E402  (the tests reach it as workflow_bed.ui_format)
import workflow_spec

PACK_FOLDER = "id_animator"  # custom_nodes/<this> in the test bed (support.harness.make_base)
STAND_INS = {  # models folder -> (test-bed folder, file) of the generated model that stands in
    "checkpoints": ("checkpoints", "sd15_random_full.safetensors"),
    "clip_vision": ("clip_vision", "CLIP-ViT-H-14-random.safetensors"),
    "id_animator": ("id_animator", "animator.ckpt"),
    "insightface/models": ("insightface", "models/scrfd"),
    "vae": ("vae", "sd2_vae_random.safetensors"),
    "text_encoders": ("text_encoders", "sd2_clip_h_random.safetensors"),
    # the official key layout at reduced width (support.unianimate_files.REDUCED): what a workflow
    # run proves (its wiring through the real packs, windows, segments) does not depend on the
    # width, and the full-size file's loading and sampling are test_unianimate_loader's; the
    # loader reads files by content, not by name
    "unianimate": ("unianimate", "unianimate_reduced.safetensors"),
}
INPUT_STAND_INS = {"person_a.png": photos.ASTRONAUT, "person_b.png": photos.NEWTON, "keyframe.png": photos.NO_FACE,
                   "dancer.png": photos.ASTRONAUT}
DANCE_VIDEO = "dance.mp4"
CI_SIZE, CI_STEPS = 64, 2  # the shipped graphs at a size a CPU renders in seconds
CI_FRAMES = 4
# The long videos keep more frames than their context window, so that windows really slide. Their
# shipped windows (16 frames for id_long_video, 32 for unianimate_long) would need 17+ and 33+
# frames, which cost the full-size UNets most of the browser tier on a CPU (id_long_video's 16-frame
# windows over 20 frames: 70 s of its 2 steps), so the windows shrink with the frames, as the latent
# does: 4 frames overlapping by 2 over 6 (the windowing code path, the fuse method and the rest of
# the context options are the shipped ones).
CI_FRAMES_BY_WORKFLOW = {"id_image": 1, "id_long_video": 6, "unianimate_long": 6}
CI_WINDOW = {"context_length": 4, "context_overlap": 2}
# unianimate_continue: shipped segments of 32 frames -> CI_FRAMES each, and the frame indices that
# cut them (`batch_index` 32, the last pose at 31) scaled with them
CI_SEGMENTS = {"unianimate_continue": (32, 2)}  # shipped frames per segment, segments
DANCE_FRAMES = 40  # enough for every workflow's CI frame count


def unianimate_stand_ins(cache: Path) -> dict[str, dict[str, Path]]:
    """The reduced UniAnimate UNet (support.unianimate_files) and the DWPose pair
    (support.dwpose_models), keyed like `models.ensure_models`; kept out of it so that only the
    workflow beds link them."""
    return {"unianimate": {"unianimate_reduced.safetensors": ensure_unianimate_file(cache, sizes=REDUCED)},
            "dwpose": dwpose_files(cache)}


def write_dance_video(path: Path, photo: Path, frames: int = DANCE_FRAMES, size: int = 128) -> None:
    """The photo sliding sideways a little per frame, H.264 at 8 fps (PyAV ships with ComfyUI)."""
    import av
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(photo).convert("RGB").resize((size, size), Image.BICUBIC))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            frame = np.ascontiguousarray(np.roll(pixels, i % 8 - 4, axis=1))
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def add_workflow_files(base: Path, model_files: dict[str, dict[str, Path]], cache: Path) -> list[Path]:
    """Returns the paths it created (for `remove_files`)."""
    created = []
    model_files = {**model_files, **unianimate_stand_ins(cache)}
    for model in workflow_spec.MODELS.values():
        dest = base / "models" / model.folder / model.name
        if dest.exists() or dest.is_symlink():
            continue
        created.append(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        folder, name = STAND_INS.get(model.folder, (model.folder, model.name))
        target = model_files[folder][name]
        dest.symlink_to(target, target_is_directory=target.is_dir())
    for name in workflow_spec.INPUTS:
        dest = base / "input" / name
        if dest.exists() or dest.is_symlink():
            continue
        created.append(dest)
        if name in INPUT_STAND_INS:
            dest.symlink_to(base / "input" / INPUT_STAND_INS[name])
        elif name == DANCE_VIDEO:
            write_dance_video(dest, base / "input" / photos.ASTRONAUT)
        else:
            make_workflows.write_placeholder_video(dest)
    return created


def remove_files(paths: list[Path]) -> None:
    """Undo `add_workflow_files` in a shared base (other tests expect e.g. no `buffalo_l` pack)."""
    for path in paths:
        path.unlink()


def workflow_names() -> list[str]:
    return [make.__name__ for make in workflow_spec.WORKFLOWS]


def load(name: str) -> dict[str, Any]:
    return json.loads((make_workflows.WORKFLOW_DIR / f"{name}.json").read_text())


def spec(name: str) -> workflow_spec.Workflow:
    return next(wf for wf in workflow_spec.all_workflows() if wf.name == name)


def expected_widgets(name: str) -> dict[int, dict[str, Any]]:
    """UI node id -> {widget name: value} for every widget value the spec sets (links excluded).
    Node ids follow spec order (ui_format.to_ui)."""
    out = {}
    for node_id, node in enumerate(spec(name).nodes.values(), start=1):
        out[node_id] = {k: v for k, v in node.inputs.items() if not isinstance(v, workflow_spec.Out)}
    return out


def ci_frames(name: str) -> int:
    """Frames per sampling run (per segment) in CI."""
    return CI_FRAMES_BY_WORKFLOW.get(name, CI_FRAMES)


def ci_output_frames(name: str) -> int:
    """Frames of the saved video in CI: every segment's."""
    return ci_frames(name) * CI_SEGMENTS.get(name, (0, 1))[1]


def shrink(name: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """The API prompt with tiny latents, few frames (and context windows to match) and CI_STEPS
    steps; nothing else changed. Returns
    {node id: {input: (shipped, shrunk)}} so a test can show exactly what it changed."""
    frames = ci_frames(name)
    # UniAnimate: the pose images' size is the video's (the latent's ×8), and the conditioning's
    # steps must stay the sampler's (it scales the starting latent for the first step)
    targets = {"EmptyLatentImage": {"width": CI_SIZE, "height": CI_SIZE, "batch_size": frames},
               "KSampler": {"steps": CI_STEPS}, "ImageFromBatch": {"length": frames},
               "UniAnimatePose": {"width": CI_SIZE, "height": CI_SIZE},
               "UniAnimateConditioning": {"steps": CI_STEPS}, "KSamplerAdvanced": {"steps": CI_STEPS},
               "UniAnimateContextWindows": CI_WINDOW, "ADE_StandardUniformContextOptions": CI_WINDOW}
    changed = {}
    for node_id, node in prompt.items():
        shrunk = dict(targets.get(node["class_type"], {}))
        if node["class_type"] == "ImageFromBatch" and name in CI_SEGMENTS:
            scale = lambda n: n * frames // CI_SEGMENTS[name][0]  # noqa: E731
            shrunk = {"batch_index": scale(node["inputs"]["batch_index"]),
                      "length": max(1, scale(node["inputs"]["length"]))}
        for key, value in shrunk.items():
            changed.setdefault(node_id, {})[key] = (node["inputs"][key], value)
            node["inputs"][key] = value
    return changed
