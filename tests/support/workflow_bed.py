"""The shipped workflows and their test bed.

`add_workflow_files` gives a ComfyUI base folder every model and input file the workflows name,
as links to the generated full-size random models (motion modules and ControlNets included,
generated under the workflows' own file names) and public-domain photos, so that the workflows
load without missing-file marks and run as shipped, only shrunk (`shrink`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from support import photos

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
}
INPUT_STAND_INS = {"person_a.png": photos.ASTRONAUT, "person_b.png": photos.NEWTON, "keyframe.png": photos.NO_FACE}
CI_SIZE, CI_STEPS = 64, 2  # the shipped graphs at a size a CPU renders in seconds
CI_FRAMES = 4
# id_long_video keeps more frames than its 16-frame context window, so that windows really slide.
CI_FRAMES_BY_WORKFLOW = {"id_image": 1, "id_long_video": 20}


def add_workflow_files(base: Path, model_files: dict[str, dict[str, Path]]) -> list[Path]:
    """Returns the paths it created (for `remove_files`)."""
    created = []
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
    return CI_FRAMES_BY_WORKFLOW.get(name, CI_FRAMES)


def shrink(name: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """The API prompt with tiny latents, few frames and CI_STEPS steps; nothing else changed. Returns
    {node id: {input: (shipped, shrunk)}} so a test can show exactly what it changed."""
    frames = ci_frames(name)
    targets = {"EmptyLatentImage": {"width": CI_SIZE, "height": CI_SIZE, "batch_size": frames},
               "KSampler": {"steps": CI_STEPS}, "ImageFromBatch": {"length": frames}}
    changed = {}
    for node_id, node in prompt.items():
        for key, value in targets.get(node["class_type"], {}).items():
            changed.setdefault(node_id, {})[key] = (node["inputs"][key], value)
            node["inputs"][key] = value
    return changed
