"""Drive the real ComfyUI frontend in headless Chromium (Playwright): open the page, load a
workflow the way a user does, read back what the graph editor shows, queue, screenshot.

Used by make_workflows.py (thumbnails) and tests/browser/. Never downloads a browser: give the
path of an installed Chromium.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1600, "height": 1000}
# Settings a returning user has: no first-run template dialog, no new-user tutorial.
USER_SETTINGS = {"Comfy.TutorialCompleted": True}
# For pictures: full detail at any zoom, no minimap.
THUMBNAIL_SETTINGS = {"LiteGraph.Canvas.MinFontSizeForLOD": 0, "Comfy.Minimap.Visible": False}

READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 50
    && document.querySelector('#graph-canvas, canvas.graph-canvas'))"""

# What the graph editor holds after a load: per node its type, whether the frontend knows it,
# and every widget (name, type, value, options) as the user sees it.
GRAPH_STATE = """() => app.graph.nodes.map(n => ({
    id: Number(n.id), type: n.type, title: n.title,
    registered: !!LiteGraph.registered_node_types[n.type],
    widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
                                          options: w.options ? {min: w.options.min, max: w.options.max} : null})),
    inputs: (n.inputs || []).map(i => ({name: i.name, type: i.type, link: i.link})),
    outputs: (n.outputs || []).map(o => ({name: o.name, type: o.type, links: o.links || []})),
}))"""


def is_frontend_race(text: str) -> bool:
    """The frontend's own overlay (PrimeVue BlockUI) removing its mask twice when a run ends while a
    workflow loads: raised inside the vendor bundle whatever the workflow is, so it says nothing
    about the graph (seen once in CI on id_sparsectrl)."""
    return "Failed to execute 'removeChild'" in text and "removeMask" in text and "vendor-primevue" in text


@contextlib.contextmanager
def open_comfyui(url: str, chromium: str, messages: list[str] | None = None,
                 settings: dict[str, Any] | None = None, viewport: dict[str, int] = VIEWPORT) -> Iterator[Any]:
    """A page with the ComfyUI frontend loaded; console errors and page errors go to `messages`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport=viewport)
            if messages is not None:
                page.on("console", lambda m: m.type == "error" and not is_frontend_race(m.text)
                        and messages.append(f"console: {m.text}"))
                page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
            for key, value in {**USER_SETTINGS, **(settings or {})}.items():
                page.request.post(f"{url}/settings/{key}", data=json.dumps(value))
            page.goto(url)
            page.wait_for_function(READY, timeout=120_000)
            page.wait_for_load_state("networkidle")
            close_dialogs(page)
            yield page
        finally:
            browser.close()


def close_dialogs(page: Any) -> list[str]:
    """Close open dialogs (e.g. the missing-nodes list, the template browser); returns their text.
    The frontend draws PrimeVue dialogs and newer ones (role=dialog over a full-page overlay that
    takes every click)."""
    texts = []
    for _ in range(5):
        dialogs = page.locator(".p-dialog:visible, [role=dialog]:visible")
        if dialogs.count() == 0:
            break
        texts.append(dialogs.first.inner_text())
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
    return texts


def load_workflow(page: Any, workflow: dict[str, Any]) -> list[str]:
    """Load through `app.loadGraphData` (what opening a file or template calls); returns dialog texts."""
    page.evaluate("async (wf) => { await app.loadGraphData(wf, true, true, null); }", workflow)
    page.wait_for_timeout(500)
    texts = close_dialogs(page)
    fit_view(page)
    return texts


def error_report(page: Any, timeout_ms: int = 1500) -> str:
    """The frontend's own error report for the open workflow (missing node packs, models, inputs),
    read from its errors tab; '' when it shows no error overlay."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    close_side_panel(page)
    try:
        page.locator("[data-testid=error-overlay]").wait_for(state="visible", timeout=timeout_ms)
    except PlaywrightTimeout:
        return ""
    page.locator("[data-testid=error-overlay-see-errors]").click()
    panel = page.locator("[data-testid=properties-panel]")
    panel.wait_for(state="visible")
    page.wait_for_timeout(300)
    text = panel.inner_text()
    close_side_panel(page)
    return text


def close_side_panel(page: Any) -> None:
    if page.locator("[data-testid=properties-panel]").is_visible():
        page.get_by_label("Toggle properties panel").first.click()
        page.wait_for_timeout(200)


def graph_state(page: Any) -> list[dict[str, Any]]:
    return page.evaluate(GRAPH_STATE)


def fit_view(page: Any) -> None:
    """The editor's own 'fit view' command: the whole graph on screen."""
    run_command(page, "Comfy.Canvas.FitView")
    page.wait_for_timeout(300)


def run_command(page: Any, command_id: str) -> None:
    page.evaluate("async (id) => { await app.extensionManager.command.execute(id); }", command_id)


def graph_box(page: Any, margin: int, limit: tuple[int, int]) -> tuple[int, int, int, int]:
    """Screen pixels around every node (title bars included), clipped to the page."""
    left, top, right, bottom = page.evaluate("""() => {
        const ds = app.canvas.ds, r = app.canvas.canvas.getBoundingClientRect();
        const box = [Infinity, Infinity, -Infinity, -Infinity];
        for (const n of app.graph.nodes) {
            const b = n.boundingRect;  // [x, y, w, h] in graph units, title included
            box[0] = Math.min(box[0], b[0]); box[1] = Math.min(box[1], b[1]);
            box[2] = Math.max(box[2], b[0] + b[2]); box[3] = Math.max(box[3], b[1] + b[3]);
        }
        const screen = (x, y) => [(x + ds.offset[0]) * ds.scale + r.left, (y + ds.offset[1]) * ds.scale + r.top];
        return [...screen(box[0], box[1]), ...screen(box[2], box[3])];
    }""")
    return (max(0, int(left) - margin), max(0, int(top) - margin),
            min(limit[0], int(right) + margin), min(limit[1], int(bottom) + margin))


def render_thumbnail(page: Any, workflow: dict[str, Any], path: Path, width: int = 800, quality: int = 75) -> None:
    """Load `workflow` in focus mode (no menus), fit it, and save the page as a JPEG `width` px wide."""
    from PIL import Image

    if page.locator(".side-tool-bar-container:visible, .side-bar-button:visible").count():
        run_command(page, "Workspace.ToggleFocusMode")
    load_workflow(page, workflow)
    page.wait_for_timeout(500)
    image = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
    image = image.crop(graph_box(page, margin=24, limit=image.size))
    height = round(image.height * width / image.width)
    image.resize((width, height), Image.LANCZOS).save(path, "JPEG", quality=quality, optimize=True)
