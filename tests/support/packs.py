"""AnimateDiff-Evolved and Advanced-ControlNet for the test bed, at the pinned commits.

Clones live in the cache under `third_party/<commit>/<name>` (made once, through the product's own
`scripts/third_party.py`, from the URL template `$IDA_PACK_URL`, default GitHub). Tests that need
them skip, saying how to provide them, when no source is reachable.
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import third_party  # noqa: E402

PACKS = third_party.PACKS
HOW = (f"set {third_party.URL_VARIABLE} to a git URL template for them, e.g. "
       f"{third_party.URL_VARIABLE}='file:///srv/git/{{name}}.git' (fields {{repo}}, {{owner}}, {{name}}), "
       "and run the tests once; see README 'Tests'")


def pack_checkouts(cache: Path) -> dict[str, Path]:
    """pack name -> checkout at the pinned commit; skips the calling test when a pack cannot be had."""
    checkouts, problems = {}, []
    for pack in third_party.PACKS:
        folder = cache / "third_party" / pack.commit
        log = io.StringIO()
        state = third_party.ensure_pack(pack, folder, third_party.url_template(), log)
        if state.ready:
            checkouts[pack.name] = state.path
        else:
            problems.append(state.message.split(". ")[0])
    if problems:
        pytest.skip(f"third-party packs unavailable ({'; '.join(problems)}): {HOW}")
    return checkouts


def install(custom_nodes: Path, checkouts: dict[str, Path]) -> None:
    """Link each checkout into a base folder's custom_nodes/."""
    for name, path in checkouts.items():
        link = custom_nodes / name
        if not link.exists():
            link.symlink_to(path, target_is_directory=True)
