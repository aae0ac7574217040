"""Model folders: `models/id_animator/`, `models/unianimate/` (the UniAnimate UNet) and
`models/dwpose/` (the two DWPose ONNX files UniAnimate's pose extraction uses), registered and
remappable in extra_model_paths.yaml, and insightface packs under
`models/insightface/models/<pack>/`, where IPAdapter_plus users keep them."""
from __future__ import annotations

import os

import folder_paths

ADAPTER_FOLDER = "id_animator"
INSIGHTFACE_FOLDER = "insightface"
ADAPTER_EXTENSIONS = {".ckpt", ".pt", ".pth", ".bin", ".safetensors"}
UNIANIMATE_FOLDER = "unianimate"  # the UniAnimate UNet (models/unianimate/)
DWPOSE_FOLDER = "dwpose"
DWPOSE_EXTENSIONS = {".onnx"}


def register() -> None:
    """Idempotent: adds our folder names with their default paths and accepted extensions."""
    for name, exts in ((ADAPTER_FOLDER, ADAPTER_EXTENSIONS), (INSIGHTFACE_FOLDER, set()),
                       (UNIANIMATE_FOLDER, ADAPTER_EXTENSIONS), (DWPOSE_FOLDER, DWPOSE_EXTENSIONS)):
        default = os.path.join(folder_paths.models_dir, name)
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, default, is_default=True)
        paths, known = folder_paths.folder_names_and_paths[name]
        if default not in paths:
            paths.append(default)
        known.update(exts)


def adapter_files() -> list[str]:
    return folder_paths.get_filename_list(ADAPTER_FOLDER)


def unianimate_files() -> list[str]:
    return folder_paths.get_filename_list(UNIANIMATE_FOLDER)


def dwpose_files() -> list[str]:
    return folder_paths.get_filename_list(DWPOSE_FOLDER)


def insightface_roots() -> list[str]:
    """Every `<insightface>/models` folder (a pack is a sub-folder of one of them)."""
    return [os.path.join(p, "models") for p in folder_paths.get_folder_paths(INSIGHTFACE_FOLDER)]


def detector_packs() -> list[str]:
    packs: set[str] = set()
    for root in insightface_roots():
        if os.path.isdir(root):
            packs.update(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    return sorted(packs)


def detector_pack_path(pack: str) -> str:
    for root in insightface_roots():
        path = os.path.join(root, pack)
        if os.path.isdir(path):
            return path
    raise FileNotFoundError(
        f"Face detector pack '{pack}' not found. Put insightface packs (e.g. buffalo_l) in "
        f"{' or '.join(insightface_roots())}/<pack>/ so that the .onnx files are directly inside it.")
