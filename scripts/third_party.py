"""The third-party node packs the shipped workflows use, at pinned, known-good commits.

`ensure_pack` fetches a pack's pinned commit (only that commit, no history) into a `custom_nodes/`
folder, or moves a checkout it made earlier to a new pin, and installs the pack's Python
requirements, if it has any, into the running Python. The source is a URL template, `$IDA_PACK_URL` (default `https://github.com/{repo}.git`),
with the fields `{repo}` (owner/name), `{owner}` and `{name}`, e.g. a local mirror:

    IDA_PACK_URL='file:///srv/git/{name}.git' scripts/run

A folder this module did not clone (a user's own checkout or copy) is never changed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from workflow_spec import PACKS as PINNED

DEFAULT_URL = "https://github.com/{repo}.git"
URL_VARIABLE = "IDA_PACK_URL"
MANAGED = "id-animator.managed"  # git config keys in clones this module made
REQUIREMENTS = "id-animator.requirements"  # sha256 of the requirements.txt last installed


@dataclass(frozen=True)
class Pack:
    title: str  # as the README names it
    repo: str  # owner/name on GitHub
    commit: str

    @property
    def name(self) -> str:
        return self.repo.split("/")[1]

    def url(self, template: str) -> str:
        owner, name = self.repo.split("/")
        return template.format(repo=self.repo, owner=owner, name=name)


PACKS = [Pack(title, repo, commit) for title, (_, repo, commit) in PINNED.items()]


@dataclass(frozen=True)
class PackState:
    pack: Pack
    path: Path
    ready: bool  # the pinned commit is checked out (or a user's own folder is left in place)
    message: str  # what happened, or what is wrong and what to do


def url_template() -> str:
    return os.environ.get(URL_VARIABLE) or DEFAULT_URL


def _git(*args: str, cwd: Path | None = None, log: TextIO) -> subprocess.CompletedProcess:
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")  # never wait for a password on stdin
    result = subprocess.run(["git", *args], cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log.write(f"$ git {' '.join(args)}\n{result.stdout}")
    return result


def _output(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def ensure_pack(pack: Pack, custom_nodes: Path, template: str, log: TextIO = sys.stderr) -> PackState:
    """Make `custom_nodes/<name>` a checkout of `pack` at its pinned commit (see module docstring)."""
    dest = custom_nodes / pack.name
    url = pack.url(template)
    advice = (f"To install it, make {url!r} reachable, or point {URL_VARIABLE} at a git mirror "
              f"(a template with {{repo}}, {{owner}} or {{name}}, e.g. 'file:///srv/git/{{name}}.git'), or clone "
              f"https://github.com/{pack.repo} into {dest} yourself and check out {pack.commit}.")
    if dest.exists() or dest.is_symlink():
        if _output("config", "--get", MANAGED, cwd=dest) != "true":
            head = _output("rev-parse", "HEAD", cwd=dest)
            note = "" if head == pack.commit else f" (tested with commit {pack.commit}; this one is {head or 'not a git checkout'})"
            return PackState(pack, dest, True, f"{pack.title}: using your own {dest}{note}")
        if _output("rev-parse", "HEAD", cwd=dest) != pack.commit and not _fetch_commit(pack, url, dest, log):
            return PackState(pack, dest, False, f"{pack.title}: cannot fetch {pack.commit} from {url}. {advice}")
    else:
        staging = custom_nodes / f".{pack.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        custom_nodes.mkdir(parents=True, exist_ok=True)
        _git("init", "--quiet", str(staging), log=log)
        _git("remote", "add", "origin", url, cwd=staging, log=log)
        _git("config", MANAGED, "true", cwd=staging, log=log)
        if not _fetch_commit(pack, url, staging, log):
            shutil.rmtree(staging, ignore_errors=True)
            return PackState(pack, dest, False, f"{pack.title}: cannot fetch {pack.commit} from {url}. {advice}")
        staging.rename(dest)  # ComfyUI never sees a half-made pack
    return _install_requirements(pack, dest, log)


def _fetch_commit(pack: Pack, url: str, checkout: Path, log: TextIO) -> bool:
    """Fetch only the pinned commit (no history) and check it out."""
    if _git("fetch", "--quiet", "--depth", "1", url, pack.commit, cwd=checkout, log=log).returncode != 0:
        return False
    return _git("checkout", "--quiet", "--detach", "FETCH_HEAD", cwd=checkout, log=log).returncode == 0


def _install_requirements(pack: Pack, dest: Path, log: TextIO) -> PackState:
    requirements = dest / "requirements.txt"
    if not requirements.exists():
        return PackState(pack, dest, True, f"{pack.title}: {dest} at {pack.commit[:12]}")
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    if _output("config", "--get", REQUIREMENTS, cwd=dest) != digest:
        result = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-r",
                                 str(requirements)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        log.write(f"$ pip install -r {requirements}\n{result.stdout}")
        code = result.returncode
        if code != 0:
            return PackState(pack, dest, False, f"{pack.title}: installing {requirements} failed (pip exit {code}); "
                             "the pack is in place but may not import. Check PyPI access and start again.")
        _git("config", REQUIREMENTS, digest, cwd=dest, log=log)
    return PackState(pack, dest, True, f"{pack.title}: {dest} at {pack.commit[:12]}, requirements installed")
