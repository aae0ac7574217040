"""Every shipped workflow in the real ComfyUI frontend (headless Chromium): listed in the template
browser with its thumbnail, loads without error, none of our nodes missing, every widget value
in the widget of the same name, IDMix's blend a slider; `id_image` queued from the page renders
an image. Screenshots go to artifacts/browser/."""
from __future__ import annotations

import math

import pytest
from support import workflow_bed
from support.workflow_bed import ui_format, workflow_spec

NAMES = workflow_bed.workflow_names()
OUR_TYPES = {"LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter", "IDA_LoadFaceScorer", "FaceSimilarity"}
MISSING_SECTIONS = ("Missing Node Packs", "Missing Models", "Missing Inputs")


def same(shown, expected) -> bool:
    if isinstance(expected, float) and isinstance(shown, (int, float)) and not isinstance(shown, bool):
        return math.isclose(shown, expected, rel_tol=1e-9, abs_tol=1e-9)
    return shown == expected


def load_from_server(page, name: str) -> tuple[list[str], str]:
    """Fetch the template as the template browser does and load it; returns (new errors, error report)."""
    from workflow_browser import error_report, load_workflow

    workflow = page.evaluate(f"async () => (await fetch('api/workflow_templates/{workflow_bed.PACK_FOLDER}/"
                             f"{name}.json')).json()")
    seen = len(page.messages)
    load_workflow(page, workflow)
    return page.messages[seen:], error_report(page)


def test_page_starts_without_errors_from_this_pack(page):
    """Our web/ extension loads once and cleanly (the page fixture records from the first request)."""
    ours = [m for m in page.messages if any(k in m for k in ("id_animator", "id-animator", "IDMix"))]
    assert not ours, ours
    assert page.evaluate("() => LiteGraph.createNode('IDMix').widgets.map(w => w.type)") == [
        "slider", "number", "id_animator_faces"]


def test_template_browser_lists_every_workflow_with_thumbnail(page, artifacts):
    page.get_by_label("Templates", exact=True).click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text(workflow_bed.PACK_FOLDER, exact=True).click()
    cards = dialog.locator("[data-testid^=template-workflow-]")
    cards.first.wait_for()
    shown = {cards.nth(i).get_attribute("data-testid").removeprefix("template-workflow-") for i in range(cards.count())}
    assert shown == set(NAMES)
    # the dialog draws a card's thumbnail only while the card is in view (ten do not fit): one by one
    widths = {}
    for i in range(cards.count()):
        card = cards.nth(i)
        card.scroll_into_view_if_needed()
        image = card.locator("img")
        image.wait_for()
        card_name = card.get_attribute("data-testid").removeprefix("template-workflow-")
        widths[card_name] = image.evaluate(
            "(i) => i.complete ? i.naturalWidth : new Promise((done) => {"
            " i.onload = () => done(i.naturalWidth); i.onerror = () => done(0); })")
    assert set(widths) == set(NAMES) and all(w > 0 for w in widths.values()), widths
    cards.first.scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "templates.png"))
    card = dialog.locator("[data-testid=template-workflow-id_image]")
    card.scroll_into_view_if_needed()
    card.click()
    dialog.wait_for(state="hidden")  # the browser closes once the click has loaded the template
    page.wait_for_function("(count) => app.graph.nodes.length === count", arg=len(workflow_bed.load("id_image")["nodes"]))
    assert sorted(page.evaluate("() => app.graph.nodes.map(n => n.type)")) == sorted(
        n["type"] for n in workflow_bed.load("id_image")["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_as_written(page, artifacts, name):
    from workflow_browser import graph_state

    errors, report = load_from_server(page, name)
    page.screenshot(path=str(artifacts / f"{name}.png"))
    assert not errors, f"{name}: the frontend reported errors while loading: {errors}"

    workflow = workflow_bed.load(name)
    state = {n["id"]: n for n in graph_state(page)}
    assert sorted(state) == sorted(n["id"] for n in workflow["nodes"])
    missing = {n["type"] for n in state.values() if not n["registered"]}
    assert not missing & (OUR_TYPES | set(workflow_bed.spec(name).node_types()) - set(workflow_spec.THIRD_PARTY))
    assert missing == set(workflow_spec.THIRD_PARTY) & workflow_bed.spec(name).node_types()

    # The frontend's error report: only the third-party packs (the test bed has every file).
    packs = {workflow_spec.PACKS[workflow_spec.THIRD_PARTY[t]["pack"]][0] for t in missing}
    if packs:
        assert "Missing Node Packs" in report and all(p in report for p in packs), report
        assert "Missing Models" not in report and "Missing Inputs" not in report, report
        assert ui_format.OUR_REGISTRY_ID not in report, report
    else:
        assert report == "", report

    # Every widget value the spec sets shows in the widget of that name (ours, core, notes).
    for node_id, values in workflow_bed.expected_widgets(name).items():
        node = state[node_id]
        if not node["registered"]:
            continue
        widgets = {w["name"]: w for w in node["widgets"]}
        for input_name, value in values.items():
            assert input_name in widgets, f"{name}/{node_id} {node['type']}: no widget {input_name!r}"
            shown = widgets[input_name]["value"]
            assert same(shown, value), f"{name}/{node_id} {node['type']}.{input_name}: shows {shown!r}, file {value!r}"

    # Saving it again gives the same values: nothing was shifted, dropped or added on load.
    resaved = dict(page.evaluate("() => app.graph.serialize().nodes.map(n => [Number(n.id), n.widgets_values])"))
    for node in workflow["nodes"]:
        if state[node["id"]]["registered"]:
            again = resaved[node["id"]] or []
            assert len(again) == len(node["widgets_values"]) and all(map(same, again, node["widgets_values"])), \
                f"{name}/{node['id']} {node['type']}: saved again as {again}, file has {node['widgets_values']}"

    # Links survive the load (the frontend drops links to slots that do not exist).
    assert page.evaluate("() => app.graph.links.size ?? Object.keys(app.graph.links).length") == len(workflow["links"])
    for node in state.values():
        if node["type"] == "IDMix":
            blend = next(w for w in node["widgets"] if w["name"] == "blend")
            assert blend["type"] == "slider" and blend["options"] == {"min": 0, "max": 1}, blend


def render_id_image_from_the_page(page, browser_server) -> tuple[dict, str]:
    """Load id_image, lower size and steps through the widgets as a user would (so the CPU renders
    in seconds) and press Queue; returns (history, the Save Image node id). The server's first run
    of id_image: a node it answered from its cache would send the page nothing (no crops)."""
    load_from_server(page, "id_image")
    page.evaluate("""([size, steps]) => {
        const set = (type, name, value) => {
            const w = app.graph.nodes.find(n => n.type === type).widgets.find(w => w.name === name);
            w.value = value; w.callback?.(value);
        };
        set('EmptyLatentImage', 'width', size); set('EmptyLatentImage', 'height', size);
        set('KSampler', 'steps', steps);
    }""", [workflow_bed.CI_SIZE, workflow_bed.CI_STEPS])
    with page.expect_response(lambda r: r.url.endswith("/prompt") and r.request.method == "POST") as posted:
        page.locator("[data-testid=queue-button]").click()
    reply = posted.value.json()
    assert "prompt_id" in reply, reply
    history = browser_server.wait(reply["prompt_id"], timeout=600)
    assert history["status"]["status_str"] == "success", history["status"]
    save_id = next(str(n["id"]) for n in workflow_bed.load("id_image")["nodes"] if n["type"] == "SaveImage")
    return history, save_id


def test_id_image_queued_from_the_page_renders_an_image_and_id_mix_shows_its_faces(page, browser_server, artifacts):
    """One render from the page (the CPU's costliest step here) serves two checks: the Save Image
    node shows the picture, and web/js/id_mix_faces.js: an IDMix fed by Face Encode nodes that have
    run draws their crops."""
    history, save_id = render_id_image_from_the_page(page, browser_server)
    assert history["outputs"][save_id]["images"], history["outputs"]
    # The page got the result too: the Save Image node shows the picture.
    page.wait_for_function("""(id) => { const n = app.graph.getNodeById(Number(id));
        return n && n.imgs && n.imgs.length > 0 && n.imgs[0].complete && n.imgs[0].naturalWidth > 0; }""",
                           arg=save_id, timeout=180_000)
    page.screenshot(path=str(artifacts / "id_image_result.png"))

    encode_id = next(n["id"] for n in workflow_bed.load("id_image")["nodes"] if n["type"] == "FaceEncode")
    page.wait_for_function("(id) => (app.graph.getNodeById(id).imgs || []).length > 0", arg=encode_id, timeout=60_000)
    result = page.evaluate("""async () => {
        const encode = app.graph.nodes.find(n => n.type === 'FaceEncode');
        const mix = LiteGraph.createNode('IDMix');
        mix.pos = [encode.pos[0], encode.pos[1] + encode.size[1] + 60];
        app.graph.add(mix);
        encode.connect(0, mix, 0); encode.connect(0, mix, 1);
        app.canvas.setDirty(true, true); app.canvas.draw(true, true);
        await new Promise(r => setTimeout(r, 300));
        app.canvas.draw(true, true);
        const faces = mix.widgets.find(w => w.type === 'id_animator_faces');
        return {shown: faces?.facesShown, saved: mix.serialize().widgets_values, encoded: (encode.imgs || []).length};
    }""")
    page.screenshot(path=str(artifacts / "id_mix_faces.png"))
    assert result["encoded"] > 0, "Face Encode shows no crop after id_image ran"
    assert result["shown"] == 2, result
    assert result["saved"] == [0.5, -1], "the faces widget must not be saved into widgets_values"
