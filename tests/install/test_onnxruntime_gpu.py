"""The documented GPU path for the face detector really ends with the CUDA provider, and a later
`pip install -r requirements.txt` keeps it (the trap users hit: both wheels share one folder)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CHECK = "import onnxruntime as ort; print(' '.join(ort.get_available_providers()))"


def run(*cmd, **kw) -> str:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw).stdout


def test_plain_requirements_give_one_working_cpu_onnxruntime():
    out = run(sys.executable, "-c", CHECK)
    assert "CPUExecutionProvider" in out.split()
    run(sys.executable, "-m", "pip", "check")


def test_gpu_script_survives_reinstalling_requirements(tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    # The trap first: both distributions installed, the CPU files written last (as a later
    # `pip install -r requirements.txt` may do): pip is content, the CUDA provider is gone.
    run(py, "-m", "pip", "install", "-q", "onnxruntime", "onnxruntime-gpu")
    run(py, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", "onnxruntime")
    run(py, "-m", "pip", "check")
    assert "CUDAExecutionProvider" not in run(py, "-c", CHECK).split()
    # Our documented path.
    out = run(py, REPO / "scripts" / "onnxruntime_gpu.py")
    assert "OK:" in out
    assert "CUDAExecutionProvider" in run(py, "-c", CHECK).split()
    # What a user (or ComfyUI-Manager) does next: the pack's requirements, minus the heavy ones.
    reqs = tmp_path / "requirements.txt"
    reqs.write_text("onnxruntime>=1.17\n")
    run(py, "-m", "pip", "install", "-q", "-r", reqs)
    assert "CUDAExecutionProvider" in run(py, "-c", CHECK).split()
    run(py, "-m", "pip", "check")
