"""OpenS2V-Nexus's FaceSim code (eval/get_facesim.py, eval/utils/curricularface) for parity tests.

Fetched once into the cache at a pinned commit from `$IDA_PACK_URL` (the template the other
third-party checkouts use, default GitHub), only the files the tests import. Imported as it is;
only its imports are stubbed where a package is not installed here: `decord` (its VideoReader,
given a PyAV reader with the same indexing). The test skips, saying how, when no source is reachable.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from support.checkout_import import namespace_package, visible_while_importing

REPO, BRANCH, COMMIT = "PKU-YuanGroup/OpenS2V-Nexus", "main", "b4528314bd73b05d1cf2a9c7f8d8ecef34e6294c"
FILES = ["eval/get_facesim.py", "eval/utils/curricularface"]


def checkout(cache: Path) -> Path:
    """The `eval/` folder of the pinned checkout (made once)."""
    folder = cache / "third_party" / COMMIT / "OpenS2V-Nexus"
    if (folder / "eval" / "get_facesim.py").is_file():
        return folder / "eval"
    owner, name = REPO.split("/")
    url = (os.environ.get("IDA_PACK_URL") or "https://github.com/{repo}.git").format(repo=REPO, owner=owner, name=name)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    if not (_from_archive(url, tmp) or _from_shallow_fetch(url, tmp)):
        shutil.rmtree(tmp, ignore_errors=True)
        pytest.skip(f"third-party packs unavailable: OpenS2V-Nexus {COMMIT[:10]} from {url}; set IDA_PACK_URL to a git URL template "
                    f"that reaches {REPO}, e.g. 'file:///srv/git/{{owner}}+{{name}}/repo'")
    os.replace(tmp, folder)
    return folder / "eval"


def _git(*args: str, cwd: Path, stdout=subprocess.PIPE) -> bool:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        return subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=stdout,
                              stderr=subprocess.DEVNULL, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _from_archive(url: str, dest: Path) -> bool:
    """Only the files, by `git archive --remote` (local mirrors; which may lack the big blobs a clone
    needs), when the branch is at the pinned commit."""
    tar = dest / "files.tar"
    with tar.open("wb") as out:
        if not _git("archive", f"--remote={url}", BRANCH, *FILES, cwd=dest, stdout=out):
            return False
    with tar.open("rb") as data:
        found = subprocess.run(["git", "get-tar-commit-id"], stdin=data, capture_output=True, text=True).stdout.strip()
    ok = found == COMMIT and subprocess.run(["tar", "xf", str(tar)], cwd=dest).returncode == 0
    tar.unlink()
    return ok


def _from_shallow_fetch(url: str, dest: Path) -> bool:
    return (_git("init", "-q", cwd=dest) and _git("fetch", "-q", "--depth", "1", url, COMMIT, cwd=dest)
            and _git("checkout", "-q", "FETCH_HEAD", "--", *FILES, cwd=dest))


class _VideoReader:
    """decord.VideoReader's indexing (len, [i].asnumpy() RGB), over PyAV-decoded frames."""

    def __init__(self, path: str) -> None:
        import av

        with av.open(path) as container:
            self.frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int):
        return types.SimpleNamespace(asnumpy=lambda: np.array(self.frames[index]))


def import_facesim(eval_dir: Path):
    """Their get_facesim module and their get_model, imported from the checkout (their `utils`, with
    no `__init__.py`, put in place by hand: a regular `utils` on sys.path, ComfyUI's in the lane that
    ran the in-process ComfyUI, would win over it)."""
    sys.path.insert(0, str(eval_dir))
    try:
        decord = types.SimpleNamespace(VideoReader=_VideoReader)
        with visible_while_importing(("utils", "get_facesim"), {"decord": decord}):
            namespace_package("utils", eval_dir / "utils")
            module = importlib.import_module("get_facesim")
            from utils.curricularface import get_model
    finally:
        sys.path.remove(str(eval_dir))
    return module, get_model
