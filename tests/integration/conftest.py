"""Fixtures for tests inside a real ComfyUI 0.30.0: generated models, a base folder with this
pack installed, an in-process executor and an HTTP server.

Memory (the whole suite must stay under 12 GB): tests that use the in-process ComfyUI run first,
then those that use the HTTP server (tests/conftest.py orders them), and each is released right
after its last test in a row, so at most one ComfyUI holds models at any time. The in-process one
keeps its output cache from module to module: ComfyUI drops a cached output as soon as a prompt
no longer uses it (before running that prompt), so the next module's graph reuses the loaders it
shares with the last one and no more than one graph's models stay loaded. A module whose first
tests run without ComfyUI (the training chain, the trainer's SD1.5 loaders) therefore starts with
the in-process ComfyUI released. The identity bed (support/identity_bed.py) is released after its
last user in the same way."""
from __future__ import annotations

from pathlib import Path

import pytest

from support.harness import InProcessComfy, OnDemandServer, make_base
from support import models, photos
from support.identity_bed import IdentityBed

REPO = Path(__file__).resolve().parents[2]
RELEASED_AFTER_LAST_USE = ("identity_bed", "comfy", "http_comfy")  # the bed first: it holds comfy's models


@pytest.fixture(scope="session")
def model_files(cache_dir, comfyui_dir, scrfd_dir) -> dict[str, dict[str, Path]]:
    return models.ensure_models(cache_dir, comfyui_dir, scrfd_dir)


@pytest.fixture(scope="session")
def comfy_base(tmp_path_factory, model_files, scrfd_dir) -> Path:
    base = make_base(tmp_path_factory.mktemp("comfy-base"), REPO, model_files)
    photos.write_inputs(base / "input", scrfd_dir)
    return base


@pytest.fixture(scope="session")
def comfy(comfyui_dir, comfy_base) -> InProcessComfy:
    """ComfyUI in this process (one per test session: ComfyUI keeps global state)."""
    return InProcessComfy(comfyui_dir, comfy_base)


@pytest.fixture(scope="session")
def identity_bed(comfy) -> IdentityBed:
    """The UNet, the adapter bundle and the astronaut's embeds, loaded once (support/identity_bed.py)."""
    return IdentityBed(comfy)


@pytest.fixture(scope="session")
def http_comfy(comfyui_dir, comfy_base, request):
    server = OnDemandServer(comfyui_dir, comfy_base, lambda: request.session.testsfailed,
                            comfy_base.parent / "comfyui-failed.log")
    yield server
    server.release()


def _released_after(item, nextitem, name: str) -> bool:
    """After its last test in a row (tests/conftest.py keeps each holder's users together)."""
    return name in item.fixturenames and (nextitem is None or name not in nextitem.fixturenames)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    last_users = [item.funcargs.get(name) for name in RELEASED_AFTER_LAST_USE if _released_after(item, nextitem, name)]
    yield  # module fixtures (which may hold models) are torn down, and tests/conftest.py clears funcargs
    for holder in last_users:
        if holder is not None:
            holder.release()
