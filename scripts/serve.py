"""Prepare a ComfyUI base folder for the shipped workflows and start ComfyUI 0.30.0 in it.

Run through `scripts/run` (which supplies the bootstrapped Python and ComfyUI). The base folder is
$IDA_BASE (default ~/ComfyUI-id-animator), never a ComfyUI of the user's: this checkout is linked
into its `custom_nodes/`, AnimateDiff-Evolved and Advanced-ControlNet are cloned beside it at the
pinned commits (source: $IDA_PACK_URL, see third_party.py), the model folders are created, and
what each shipped workflow still lacks is listed. Without network the packs are reported and
ComfyUI starts anyway. Arguments other than --comfyui go to ComfyUI's main.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from third_party import PACKS, ensure_pack, url_template
from workflow_spec import MODELS, ModelFile, all_workflows

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER = "id_animator"


def prepare_base(base: Path) -> None:
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / PACK_FOLDER
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    for model in MODELS.values():
        (base / "models" / model.folder).mkdir(parents=True, exist_ok=True)
    for sub in ("input", "output"):
        (base / sub).mkdir(exist_ok=True)


def present(models: Path, model: ModelFile) -> bool:
    path = models / model.folder / model.name
    if model.folder == "insightface/models":  # a pack is a folder of .onnx files
        return path.is_dir() and any(path.glob("*.onnx"))
    return path.is_file()


def missing_report(models: Path) -> list[str]:
    """Lines saying, per shipped workflow, which model files it lacks, then where each goes."""
    lacking: dict[str, list[str]] = {}
    for workflow in all_workflows():
        names = [n for n in workflow.files() if n in MODELS and not present(models, MODELS[n])]
        lacking[workflow.name] = names
    needed = list(dict.fromkeys(n for names in lacking.values() for n in names))
    if not needed:
        return ["ID-Animator: every model file the shipped workflows name is in place."]
    lines = ["ID-Animator: model files the shipped workflows still lack (the graph editor starts anyway):"]
    lines += [f"  {name}: {', '.join(names) if names else 'ready'}" for name, names in lacking.items()]
    lines.append("Where each goes and where to get it (README, 'Model files'):")
    for name in needed:
        model = MODELS[name]
        lines.append(f"  {models / model.folder / name}  <- {model.what}; {model.source}")
    if any(MODELS[n].folder == "checkpoints" for n in needed):
        lines.append("  (any SD1.5 checkpoint works: put yours in models/checkpoints/ and pick it in Load Checkpoint)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, type=Path)
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--listen", nargs="?", const="0.0.0.0,::", default="127.0.0.1")
    args, comfy_args = parser.parse_known_args()
    base = Path(os.environ.get("IDA_BASE", Path.home() / "ComfyUI-id-animator")).expanduser()
    prepare_base(base)

    template = url_template()
    log_path = base / "third-party-packs.log"
    with open(log_path, "a") as log:
        states = [ensure_pack(pack, base / "custom_nodes", template, log) for pack in PACKS]
    for state in states:
        print(("" if state.ready else "NOT INSTALLED: ") + state.message, flush=True)
    if not all(state.ready for state in states):
        print(f"(git's output is in {log_path}; workflows using a missing pack show it as missing)", flush=True)
    print("\n".join(missing_report(base / "models")), flush=True)

    import torch

    device_args = [] if torch.cuda.is_available() else ["--cpu"]
    # ComfyUI's default database sits inside its own tree (our cache), whose user/ folder does not
    # exist: every start logged "Failed to initialize database". It belongs with the user's files.
    database_args = []
    if not any(arg.split("=", 1)[0] == "--database-url" for arg in comfy_args):
        (base / "user").mkdir(parents=True, exist_ok=True)
        database_args = [f"--database-url=sqlite:///{base / 'user' / 'comfyui.db'}"]
    cmd = [sys.executable, str(args.comfyui / "main.py"), "--listen", args.listen, "--port", str(args.port),
           "--base-directory", str(base), "--disable-api-nodes", *device_args, *database_args, *comfy_args]
    host = args.listen if args.listen.count(",") == 0 and args.listen not in ("0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    print(f"Starting ComfyUI 0.30.0 on http://{host}:{args.port} (base folder {base})", flush=True)
    os.chdir(args.comfyui)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
