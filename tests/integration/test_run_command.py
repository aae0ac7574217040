"""The README's run command: ComfyUI 0.30.0 with this pack, AnimateDiff-Evolved and
Advanced-ControlNet at the pinned commits (from the documented URL override), what each shipped
workflow still lacks, and the address it really serves; without a source for the packs it says
what to do and starts anyway, and it never changes a pack folder it did not make."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

from support import packs, workflow_bed
from support.harness import free_port
from support.workflow_bed import workflow_names, workflow_spec

REPO = Path(__file__).resolve().parents[2]
OUR_NODES = {"LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter"}


@contextlib.contextmanager
def run_command(base: Path, pack_url: str, log: Path) -> Iterator[tuple[dict[str, Any], int]]:
    """`scripts/run --port P` with IDA_BASE=base; yields (/object_info, port) once it serves."""
    port = free_port()
    env = dict(os.environ, IDA_BASE=str(base), IDA_PACK_URL=pack_url)
    with open(log, "w") as out:
        proc = subprocess.Popen([str(REPO / "scripts" / "run"), "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline, info = time.time() + 300, None
        while time.time() < deadline and info is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/object_info", timeout=30) as reply:
                    info = json.loads(reply.read())
            except OSError:
                time.sleep(1)
        assert info is not None, log.read_text()[-3000:]
        yield info, port
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def head(folder: Path) -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True).stdout.strip()


def test_run_command_brings_the_packs_and_lists_what_each_workflow_lacks(tmp_path, cache_dir):
    mirror = tmp_path / "mirror"  # a local git mirror, as the README's IDA_PACK_URL example
    mirror.mkdir()
    for name, checkout in packs.pack_checkouts(cache_dir).items():
        (mirror / name).symlink_to(checkout, target_is_directory=True)
    base = tmp_path / "base"
    log = tmp_path / "run.log"
    with run_command(base, f"file://{mirror}/{{name}}", log) as (info, port):
        assert OUR_NODES <= set(info)
        assert set(workflow_spec.THIRD_PARTY) <= set(info), sorted(set(workflow_spec.THIRD_PARTY) - set(info))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=10) as reply:
            assert json.loads(reply.read())["system"]["comfyui_version"].startswith("0.30.0")
    text = log.read_text()
    assert f"http://127.0.0.1:{port}" in text and ":8188" not in text, text[:3000]
    assert "IMPORT FAILED" not in text and "NOT INSTALLED" not in text, text[-3000:]
    assert "Failed to initialize database" not in text and (base / "user" / "comfyui.db").is_file(), text[-3000:]
    for pack in packs.PACKS:
        assert head(base / "custom_nodes" / pack.name) == pack.commit
    assert (base / "custom_nodes" / "id_animator").resolve() == REPO
    lines = text.splitlines()
    for name in workflow_names():  # one line per workflow, naming every model file it still lacks
        line = next(l for l in lines if l.strip().startswith(f"{name}:"))
        wanted = [f for f in workflow_bed.spec(name).files() if f in workflow_spec.MODELS]
        assert wanted and all(f in line for f in wanted), line
    for model in workflow_spec.MODELS.values():
        assert str(base / "models" / model.folder / model.name) in text, model.name


def test_run_command_without_a_pack_source_says_what_to_do_and_starts(tmp_path):
    base = tmp_path / "base"
    users_own = base / "custom_nodes" / "ComfyUI-Advanced-ControlNet"  # e.g. a copy the user put there
    users_own.mkdir(parents=True)
    (users_own / "mine.txt").write_text("not a git checkout")
    log = tmp_path / "run.log"
    with run_command(base, f"file://{tmp_path}/no-such-mirror/{{name}}", log) as (info, _):
        assert OUR_NODES <= set(info)
    text = log.read_text()
    assert "NOT INSTALLED: AnimateDiff-Evolved" in text and "IDA_PACK_URL" in text, text[:3000]
    assert not (base / "custom_nodes" / "ComfyUI-AnimateDiff-Evolved").exists()
    assert sorted(p.name for p in users_own.iterdir()) == ["mine.txt"], "a folder we did not clone was changed"
    assert "using your own" in text
