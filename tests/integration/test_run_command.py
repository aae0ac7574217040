"""The README's run command brings up ComfyUI 0.30.0 with the pack and reports missing models."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from support.harness import free_port

REPO = Path(__file__).resolve().parents[2]


def test_run_command_serves_the_pack_and_lists_missing_models(tmp_path):
    port = free_port()
    log = tmp_path / "run.log"
    env = dict(os.environ, IDA_BASE=str(tmp_path / "base"))
    with open(log, "w") as out:
        proc = subprocess.Popen([str(REPO / "scripts" / "run"), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline, info = time.time() + 240, None
        while time.time() < deadline and info is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=10) as r:
                    info = json.loads(r.read())
            except OSError:
                time.sleep(1)
        assert info is not None, log.read_text()[-3000:]
        assert {"LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter"} <= set(info)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=10) as r:
            assert json.loads(r.read())["system"]["comfyui_version"].startswith("0.30.0")
        text = log.read_text()
        base = tmp_path / "base" / "models"
        for where in (base / "id_animator", base / "clip_vision", base / "insightface" / "models" / "buffalo_l"):
            assert str(where) in text, text[:3000]
        assert "animator.ckpt" in text and "IMPORT FAILED" not in text
        assert (tmp_path / "base" / "custom_nodes" / "id_animator").resolve() == REPO
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
