"""The shipped workflows against a live ComfyUI: generated from the spec, every node of ours and
of core matching /object_info, every link type-correct, third-party nodes only from the pinned
table, served as templates with thumbnails and help pages. Running them is the browser tier's:
each is dropped on the real frontend and run end to end (tests/browser/test_workflows_run.py)."""
from __future__ import annotations

import io
import urllib.request

import pytest
from PIL import Image
from support import workflow_bed
from support.workflow_bed import make_workflows, ui_format, workflow_spec

NAMES = workflow_bed.workflow_names()


@pytest.fixture(scope="module")
def server(http_comfy, comfy_base, model_files, cache_dir):
    """The session's server, with the workflows' files in its base while this module runs."""
    added = workflow_bed.add_workflow_files(comfy_base, model_files, cache_dir)
    yield http_comfy
    workflow_bed.remove_files(added)


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def definition(node_type: str, object_info: dict) -> dict:
    if node_type in object_info:
        return object_info[node_type]
    return workflow_spec.THIRD_PARTY[node_type]


def test_files_are_what_the_generator_writes(object_info):
    stale = make_workflows.stale_files(object_info)
    assert not stale, f"regenerate with `python scripts/make_workflows.py`: {stale}"


def test_spec_errors_are_caught(object_info):
    broken = workflow_bed.spec("id_image")
    broken.nodes["apply"].inputs["weight"] = 5.0  # above ApplyFaceAdapter's max of 2
    with pytest.raises(ui_format.SpecError, match="weight"):
        ui_format.to_ui(broken, object_info)
    broken = workflow_bed.spec("id_image")
    broken.nodes["sampler"].inputs["model"] = broken.nodes["encode"]["face_embeds"]
    with pytest.raises(ui_format.SpecError, match="FACE_EMBEDS"):
        ui_format.to_ui(broken, object_info)


@pytest.mark.parametrize("name", NAMES)
def test_installed_nodes_match_live_schema(name, object_info):
    """Ours and core: inputs in the frontend's order, one valid value per widget, outputs as declared."""
    for node in workflow_bed.load(name)["nodes"]:
        if node["type"] in ui_format.FRONTEND_ONLY or node["type"] in workflow_spec.THIRD_PARTY:
            continue
        assert node["type"] in object_info, f"{name}: {node['type']} is not a node this ComfyUI knows"
        live = object_info[node["type"]]
        slots = ui_format.slots(live)
        sockets = [s for s in slots if not s.is_widget]
        widgets = [s for s in slots if s.is_widget]
        listed = [(i["name"], i["type"]) for i in node["inputs"] if i["name"] != "upload"]
        assert listed == [(s.name, s.type) for s in sockets + widgets], f"{name}/{node['id']} {node['type']}"
        values = list(node["widgets_values"])
        for slot in widgets:
            value = values.pop(0)
            where = f"{name}/{node['id']} {node['type']}.{slot.name}"
            if slot.choices is not None:
                assert value in slot.choices, f"{where}: {value!r} not offered (test bed lacks a file?)"
            elif slot.type in ("INT", "FLOAT"):
                assert slot.options.get("min", value) <= value <= slot.options.get("max", value), where
            if slot.options.get("control_after_generate"):
                assert values.pop(0) in ("fixed", "increment", "decrement", "randomize"), where
            if any(slot.options.get(flag) for flag in ui_format.MEDIA_UPLOAD):
                assert values.pop(0) == "image", where
        assert not values, f"{name}/{node['id']} {node['type']}: extra widget values {values}"
        outputs = [(o["name"], o["type"]) for o in node["outputs"]]
        assert outputs == list(zip(live["output_name"], live["output"])), f"{name}/{node['id']} {node['type']}"


@pytest.mark.parametrize("name", NAMES)
def test_links_join_matching_types(name, object_info):
    workflow = workflow_bed.load(name)
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        out_type = definition(nodes[origin]["type"], object_info)["output"][origin_slot]
        target_input = nodes[target]["inputs"][target_slot]
        in_slot = next(s for s in ui_format.slots(definition(nodes[target]["type"], object_info))
                       if s.name == target_input["name"])
        where = f"{name} link {link_id}: {nodes[origin]['type']} -> {nodes[target]['type']}.{in_slot.name}"
        assert link_type == out_type, where
        assert not in_slot.is_widget and ui_format.types_connect(out_type, in_slot.type), where
        assert target_input["link"] == link_id, where
        assert link_id in nodes[origin]["outputs"][origin_slot]["links"], where
    connected = {(n["id"], i["name"]) for n in workflow["nodes"] for i in n["inputs"] if i["link"] is not None}
    for node in workflow["nodes"]:
        if node["type"] in ui_format.FRONTEND_ONLY:
            continue
        for slot in ui_format.slots(definition(node["type"], object_info)):
            if not slot.is_widget and not slot.optional:
                assert (node["id"], slot.name) in connected, f"{name}: {node['type']}.{slot.name} unconnected"


def test_third_party_nodes_come_from_the_table(object_info):
    used = set()
    for name in NAMES:
        for node in workflow_bed.load(name)["nodes"]:
            if node["type"] not in object_info and node["type"] not in ui_format.FRONTEND_ONLY:
                assert node["type"] in workflow_spec.THIRD_PARTY, f"{name}: {node['type']} is in no table"
                registry_id, _, commit = workflow_spec.PACKS[workflow_spec.THIRD_PARTY[node["type"]]["pack"]]
                assert node["properties"]["cnr_id"] == registry_id and node["properties"]["ver"] == commit
                used.add(node["type"])
    assert used == set(workflow_spec.THIRD_PARTY), "table rows no workflow uses"


def test_served_as_templates_with_thumbnails(server):
    listed = server.get("/workflow_templates")
    assert sorted(listed.get(workflow_bed.PACK_FOLDER, [])) == sorted(NAMES)
    for name in NAMES:
        url = f"{server.url}/api/workflow_templates/{workflow_bed.PACK_FOLDER}/{name}.jpg"
        with urllib.request.urlopen(url, timeout=30) as reply:
            data = reply.read()
        assert len(data) < make_workflows.THUMBNAIL_MAX_BYTES, name
        assert Image.open(io.BytesIO(data)).format == "JPEG", name


def test_help_pages_are_served_where_the_frontend_looks(server):
    """The frontend fetches /extensions/<pack folder>/docs/<node id>.md for a custom node's help."""
    for node_id in ("LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter", "IDA_LoadFaceScorer", "FaceSimilarity"):
        url = f"{server.url}/extensions/{workflow_bed.PACK_FOLDER}/docs/{node_id}.md"
        with urllib.request.urlopen(url, timeout=30) as reply:
            assert "text/html" not in reply.headers.get("Content-Type", ""), node_id
            assert reply.read().decode().startswith("# "), node_id
