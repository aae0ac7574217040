"""A ComfyUI with this pack and the workflows' test bed, and one headless Chromium page on it.

Chromium comes from $IDA_CHROMIUM (set by scripts/test; Debian's /usr/bin/chromium); without it
every browser test is skipped before any server starts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import models, photos, workflow_bed
from support.harness import make_base, serving

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"


@pytest.fixture(scope="session")
def chromium() -> str:
    path = os.environ.get("IDA_CHROMIUM", "")
    if not path or not os.access(path, os.X_OK):
        pytest.skip("no Chromium: IDA_CHROMIUM is empty or not executable (apt-get install chromium)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Python playwright is not installed in this environment")
    return path


@pytest.fixture(scope="session")
def browser_base(chromium, tmp_path_factory, cache_dir, comfyui_dir, scrfd_dir) -> Path:
    model_files = models.ensure_models(cache_dir, comfyui_dir, scrfd_dir)
    base = make_base(tmp_path_factory.mktemp("browser-base"), REPO, model_files)
    photos.write_inputs(base / "input", scrfd_dir)
    workflow_bed.add_workflow_files(base, model_files, cache_dir)
    return base


@pytest.fixture(scope="module")
def browser_server(comfyui_dir, browser_base, request):
    """UNet weights in bf16 (`--bf16-unet`, as test_workflows_run's server): on the CPU ComfyUI
    still computes in fp32, and the page's id_image render holds 1.7 GB less (the SD1.5 UNet in
    fp32 made this server the whole command's peak)."""
    with serving(comfyui_dir, browser_base, lambda: request.session.testsfailed,
                 ARTIFACTS / "comfyui.log", extra_args=("--bf16-unet",)) as server:
        yield server


@pytest.fixture(scope="module")
def page(browser_server, chromium):
    from workflow_browser import open_comfyui

    messages: list[str] = []
    with open_comfyui(browser_server.url, chromium, messages) as page:
        page.messages = messages  # console errors and page errors, appended as they happen
        yield page


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
