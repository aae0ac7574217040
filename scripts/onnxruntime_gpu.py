"""Give the face detector the CUDA provider: install onnxruntime-gpu so that it wins, and check.

Why this exists: insightface depends on the CPU `onnxruntime`, and `onnxruntime-gpu` writes the
same `onnxruntime/` folder. Installed side by side in one pip run, the CPU files may land last and
the CUDA provider silently disappears. This script keeps the CPU distribution installed (so
insightface's requirement stays satisfied and a later `pip install -r requirements.txt` changes
nothing), then force-reinstalls the GPU wheel so its files are the ones on disk, and verifies.

Run it with the Python that runs ComfyUI:
    python custom_nodes/<this pack>/scripts/onnxruntime_gpu.py [--version 1.31.1] [--cuda-libs]
"""
from __future__ import annotations

import argparse
import subprocess
import sys

CHECK = "import onnxruntime as ort; print(' '.join(ort.get_available_providers()))"


def pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def providers() -> list[str]:
    out = subprocess.run([sys.executable, "-c", CHECK], check=True, capture_output=True, text=True)
    return out.stdout.split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="", help="onnxruntime-gpu version (default: newest)")
    parser.add_argument("--cuda-libs", action="store_true",
                        help="also install NVIDIA's CUDA/cuDNN runtime wheels (the [cuda,cudnn] extras), "
                             "for machines without a system CUDA toolkit")
    args = parser.parse_args()
    pin = f"=={args.version}" if args.version else ""
    extras = "[cuda,cudnn]" if args.cuda_libs else ""
    pip("install", f"onnxruntime{pin}")  # keeps insightface's requirement satisfied
    pip("install", f"onnxruntime-gpu{extras}{pin}")  # the GPU wheel's dependencies
    pip("install", "--force-reinstall", "--no-deps", f"onnxruntime-gpu{pin}")  # its files land last
    found = providers()
    print("onnxruntime providers now available:", ", ".join(found))
    if "CUDAExecutionProvider" not in found:
        print("CUDAExecutionProvider is still missing: see README 'Face detection on the GPU'.", file=sys.stderr)
        return 1
    print("OK: LoadIDAnimator with provider 'auto' or 'CUDA' will run the detector on the GPU "
          "(the node logs the providers it really uses).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
