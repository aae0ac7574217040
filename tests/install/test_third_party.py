"""scripts/third_party.py on a local git repository: the pinned commit (and only it) is fetched,
a checkout it made follows a new pin, a pack's requirements are installed once per content, and
a missing source is reported, not raised."""
from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import third_party  # noqa: E402


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit(source: Path, message: str, files: dict[str, str]) -> str:
    for name, text in files.items():
        (source / name).write_text(text)
    git("add", "-A", cwd=source)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message, cwd=source)
    return git("rev-parse", "HEAD", cwd=source)


def test_pinned_commit_new_pin_requirements_and_missing_source(tmp_path):
    source = tmp_path / "mirror" / "ComfyUI-Fake"
    source.mkdir(parents=True)
    git("init", "-q", cwd=source)
    first = commit(source, "one", {"__init__.py": "VERSION = 1\n", "requirements.txt": "# nothing to install\n"})
    second = commit(source, "two", {"__init__.py": "VERSION = 2\n"})
    template = f"file://{tmp_path}/mirror/{{name}}"
    custom_nodes = tmp_path / "custom_nodes"

    log = io.StringIO()
    state = third_party.ensure_pack(third_party.Pack("Fake", "someone/ComfyUI-Fake", first), custom_nodes, template, log)
    checkout = custom_nodes / "ComfyUI-Fake"
    assert state.ready and state.path == checkout, state.message
    assert git("rev-parse", "HEAD", cwd=checkout) == first
    assert (checkout / "__init__.py").read_text() == "VERSION = 1\n"
    assert git("rev-list", "--count", "HEAD", cwd=checkout) == "1", "only the pinned commit is fetched"
    assert "requirements installed" in state.message and "pip install -r" in log.getvalue()

    log = io.StringIO()  # same pin again: nothing fetched, requirements not reinstalled
    assert third_party.ensure_pack(third_party.Pack("Fake", "someone/ComfyUI-Fake", first), custom_nodes, template, log).ready
    assert "fetch" not in log.getvalue() and "pip install" not in log.getvalue()

    state = third_party.ensure_pack(third_party.Pack("Fake", "someone/ComfyUI-Fake", second), custom_nodes, template,
                                    io.StringIO())
    assert state.ready and git("rev-parse", "HEAD", cwd=checkout) == second
    assert (checkout / "__init__.py").read_text() == "VERSION = 2\n"

    missing = third_party.ensure_pack(third_party.Pack("Gone", "someone/ComfyUI-Gone", first), custom_nodes,
                                      template, io.StringIO())
    assert not missing.ready and third_party.URL_VARIABLE in missing.message
    assert not (custom_nodes / "ComfyUI-Gone").exists() and not list(custom_nodes.glob(".*partial"))
