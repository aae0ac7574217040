"""Prepare a ComfyUI base folder with this pack installed, report missing models, start ComfyUI.

Run through `scripts/run` (which supplies the bootstrapped Python and ComfyUI). The base folder
is $IDA_BASE (default ~/ComfyUI-id-animator); model folders are created inside it.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_FOLDER = "id_animator"

# (models sub-folder, what satisfies it, the file users need and where it comes from)
MODEL_FILES = [
    ("checkpoints", (".safetensors", ".ckpt"),
     "an SD1.5 checkpoint, e.g. realisticVisionV60B1_v51VAE.safetensors (Civitai / Hugging Face)"),
    ("id_animator", (".ckpt", ".safetensors", ".pt", ".pth", ".bin"),
     "animator.ckpt from the ID-Animator Hugging Face Space (huggingface.co/spaces/ID-Animator/ID-Animator)"),
    ("clip_vision", (".safetensors", ".bin", ".pt"),
     "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors (h94/IP-Adapter models/image_encoder/model.safetensors)"),
    ("animatediff_models", (".ckpt", ".safetensors"),
     "mm_sd_v15_v2.ckpt (guoyww/animatediff) for AnimateDiff-Evolved video workflows"),
]


def missing_models(models: Path) -> list[str]:
    report = []
    for folder, exts, what in MODEL_FILES:
        d = models / folder
        if not any(p.suffix.lower() in exts for p in d.glob("*")):
            report.append(f"  {d}/  <- {what}")
    packs = models / "insightface" / "models"
    if not any(any(p.glob("*.onnx")) for p in packs.glob("*") if p.is_dir()):
        report.append(f"  {packs}/buffalo_l/  <- the insightface buffalo_l pack (det_10g.onnx ...; "
                      "non-commercial licence), unzipped so the .onnx files are directly inside")
    return report


def prepare_base(base: Path) -> None:
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    link = custom / PACK_FOLDER
    if link.is_symlink() and link.resolve() != REPO:
        link.unlink()
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    for folder, _, _ in MODEL_FILES:
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
    (base / "models" / "insightface" / "models").mkdir(parents=True, exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, type=Path)
    args, comfy_args = parser.parse_known_args()
    base = Path(os.environ.get("IDA_BASE", Path.home() / "ComfyUI-id-animator")).expanduser()
    prepare_base(base)
    missing = missing_models(base / "models")
    if missing:
        print("ID-Animator: these model files are missing (the graph editor still starts):", flush=True)
        print("\n".join(missing), flush=True)
    else:
        print("ID-Animator: all model folders have files.", flush=True)
    import torch

    device_args = [] if torch.cuda.is_available() else ["--cpu"]
    cmd = [sys.executable, str(args.comfyui / "main.py"), "--listen", "127.0.0.1", "--port", "8188",
           "--base-directory", str(base), "--disable-api-nodes", *device_args, *comfy_args]
    print("Starting ComfyUI 0.30.0 on http://127.0.0.1:8188 (base folder %s)" % base, flush=True)
    os.chdir(args.comfyui)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
