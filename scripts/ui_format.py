"""Turn a `workflow_spec.Workflow` (inputs by name) into the frontend's UI-format workflow JSON.

The rules below are the ones ComfyUI frontend 1.47 follows when it serializes a graph (checked in
the browser by tests/browser/test_workflows_browser.py, which loads every file and compares each
widget by name):
- an input is a widget when its type is INT, FLOAT, STRING, BOOLEAN, COMBO (or a list of options)
  or a dynamic combo, unless it has `forceInput`; every other input is a socket;
- `inputs` lists the sockets first, then the widget inputs (`widget: {name}`), each in
  `input_order` (required, then optional); optional inputs carry `shape: 7`;
- `widgets_values` holds one value per widget in that order; an input with
  `control_after_generate` is followed by the control value ("fixed", "randomize", ...), a media
  combo (`image_upload`, `video_upload`, `animated_image_upload`) by the upload button's "image";
- links are `[id, origin_id, origin_slot, target_id, target_slot, type]`.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from workflow_spec import INPUTS, MODELS, PACKS, THIRD_PARTY, Node, Out, Workflow

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "COMFY_DYNAMICCOMBO_V3"}
MEDIA_UPLOAD = ("image_upload", "video_upload", "animated_image_upload")
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # virtual nodes: one text widget, never sent to the server
OUR_REGISTRY_ID = "id-animator"
COLUMN_GAP, ROW_GAP, TITLE_HEIGHT = 60, 50, 30
EXTRA_HEIGHT = {"IDMix": 94}  # web/js/id_mix_faces.js draws the two faces under the slider


class SpecError(ValueError):
    """A workflow spec that does not fit the node definitions."""


@dataclass(frozen=True)
class Slot:
    name: str
    type: str
    optional: bool
    options: dict[str, Any]
    choices: list | None  # combo options, None for other types

    @property
    def is_widget(self) -> bool:
        return (self.choices is not None or self.type in WIDGET_TYPES) and not self.options.get("forceInput")


def slots(definition: dict[str, Any]) -> list[Slot]:
    """Inputs of an /object_info definition in the order the frontend creates them."""
    out = []
    for section in ("required", "optional"):
        inputs = definition.get("input", {}).get(section, {})
        order = definition.get("input_order", {}).get(section, list(inputs))
        for name in order:
            spec = inputs[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(spec[0], list):
                out.append(Slot(name, "COMBO", section == "optional", options, spec[0]))
            elif spec[0] == "COMBO":
                out.append(Slot(name, "COMBO", section == "optional", options, options.get("options", [])))
            else:
                out.append(Slot(name, spec[0], section == "optional", options, None))
    return out


def definition_of(node_type: str, object_info: dict[str, Any]) -> dict[str, Any]:
    """Third-party nodes always come from the pinned table; ours and core from the live server."""
    if node_type in THIRD_PARTY:
        return THIRD_PARTY[node_type]
    if node_type in FRONTEND_ONLY:
        return {"input": {"required": {"text": ["STRING", {"multiline": True}]}}, "output": [], "output_name": []}
    if node_type not in object_info:
        raise SpecError(f"node type {node_type!r} is neither in /object_info nor in workflow_spec.THIRD_PARTY")
    return object_info[node_type]


def widget_values(wf: Workflow, node: Node, widgets: list[Slot]) -> list[Any]:
    values = []
    for slot in widgets:
        where = f"{wf.name}/{node.key} ({node.type}).{slot.name}"
        if slot.name in node.inputs:
            value = node.inputs[slot.name]
        elif "default" in slot.options:
            value = slot.options["default"]
        else:
            raise SpecError(f"{where}: no value and no default; set it in workflow_spec")
        check_value(where, slot, value)
        values.append(value)
        if slot.options.get("control_after_generate"):
            values.append(node.inputs.get("control_after_generate", "fixed"))
        if any(slot.options.get(flag) for flag in MEDIA_UPLOAD):
            values.append("image")
    return values


def check_value(where: str, slot: Slot, value: Any) -> None:
    if slot.type == "COMFY_DYNAMICCOMBO_V3":
        choice = next((o for o in slot.options.get("options", []) if o.get("key") == value), None)
        if choice is None or any(choice.get("inputs", {}).get(s) for s in ("required", "optional")):
            raise SpecError(f"{where}: {value!r} is not a dynamic-combo choice without sub-inputs")
    elif slot.choices is not None:
        is_file = value in MODELS or value in INPUTS
        if value not in slot.choices and not is_file and not slot.options.get("files"):
            raise SpecError(f"{where}: {value!r} not among {slot.choices[:8]}")
    elif slot.type in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (slot.type == "INT" and value != int(value)):
            raise SpecError(f"{where}: {value!r} is not a {slot.type}")
        low, high = slot.options.get("min", float("-inf")), slot.options.get("max", float("inf"))
        if not low <= value <= high:
            raise SpecError(f"{where}: {value} outside [{low}, {high}]")
    elif slot.type == "BOOLEAN" and not isinstance(value, bool):
        raise SpecError(f"{where}: {value!r} is not a BOOLEAN")
    elif slot.type == "STRING" and not isinstance(value, str):
        raise SpecError(f"{where}: {value!r} is not a STRING")


def types_connect(output_type: str, input_type: str) -> bool:
    """The frontend's rule: equal, a wildcard, or one of the comma-separated alternatives."""
    if "*" in (output_type, input_type) or output_type == input_type:
        return True
    return bool(set(output_type.split(",")) & set(input_type.split(",")))


def topological_order(wf: Workflow) -> list[str]:
    done: list[str] = []

    def visit(key: str, path: tuple[str, ...]) -> None:
        if key in done:
            return
        if key in path:
            raise SpecError(f"{wf.name}: cycle through {' -> '.join(path + (key,))}")
        for value in wf.nodes[key].inputs.values():
            if isinstance(value, Out):
                if value.node not in wf.nodes:
                    raise SpecError(f"{wf.name}/{key}: link from unknown node {value.node!r}")
                visit(value.node, path + (key,))
        done.append(key)

    for key in wf.nodes:
        visit(key, ())
    return done


def node_size(node_type: str, sockets: int, outputs: int, widgets: list[Slot], text: str = "") -> list[int]:
    """A size at least as large as the one LiteGraph computes, so nothing is clipped on load."""
    if node_type in FRONTEND_ONLY:
        lines = sum(1 + len(line) // 52 for line in text.splitlines())
        return [440, 40 + 19 * lines]
    if node_type == "CLIPTextEncode":
        return [420, 180]
    if node_type in ("PreviewImage", "SaveImage", "SaveVideo", "LoadImage", "LoadVideo"):
        return [300, 330]  # room for the image or video preview
    return [330, 12 + 22 * max(sockets, outputs) + 26 * len(widgets) + EXTRA_HEIGHT.get(node_type, 0)]


def properties(node_type: str, definition: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {"Node name for S&R": node_type}
    if node_type in THIRD_PARTY:
        registry_id, repo, commit = PACKS[definition["pack"]]
        props.update(cnr_id=registry_id, aux_id=repo, ver=commit)
    elif str(definition.get("python_module", "")).startswith("custom_nodes."):
        props["cnr_id"] = OUR_REGISTRY_ID
    return props


def to_ui(wf: Workflow, object_info: dict[str, Any]) -> dict[str, Any]:
    """The UI-format JSON of one workflow; raises SpecError on anything the frontend would reject."""
    order = topological_order(wf)
    ids = {key: i + 1 for i, key in enumerate(wf.nodes)}
    defs = {key: definition_of(n.type, object_info) for key, n in wf.nodes.items()}
    layouts: dict[str, dict[str, Any]] = {}
    links: list[list[Any]] = []
    outputs_links: dict[tuple[str, int], list[int]] = {}

    for key, node in wf.nodes.items():
        definition = defs[key]
        all_slots = slots(definition)
        names = {s.name for s in all_slots} | {"control_after_generate"}
        unknown = set(node.inputs) - names
        if unknown:
            raise SpecError(f"{wf.name}/{key} ({node.type}): unknown inputs {sorted(unknown)}; has {sorted(names)}")
        sockets = [s for s in all_slots if not s.is_widget]
        widgets = [s for s in all_slots if s.is_widget]
        inputs = []
        for index, slot in enumerate(sockets + widgets):
            entry: dict[str, Any] = {"name": slot.name, "type": slot.type, "link": None}
            if slot.is_widget:
                entry["widget"] = {"name": slot.name}
            if slot.optional:
                entry["shape"] = 7
            value = node.inputs.get(slot.name)
            if isinstance(value, Out):
                entry["link"] = connect(wf, key, slot, index, value, wf.nodes, defs, ids, links, outputs_links)
            elif not slot.is_widget and not slot.optional:
                raise SpecError(f"{wf.name}/{key} ({node.type}): required input {slot.name!r} is not connected")
            inputs.append(entry)
        if node.type in FRONTEND_ONLY:
            inputs = []  # the frontend keeps no input slot for a note's text
        if any(any(s.options.get(f) for f in MEDIA_UPLOAD) for s in widgets):
            inputs.append({"name": "upload", "type": "IMAGEUPLOAD", "widget": {"name": "upload"}, "link": None})
        layouts[key] = {
            "id": ids[key], "type": node.type, "pos": [0, 0],
            "size": node_size(node.type, len(sockets), len(definition.get("output", [])), widgets,
                              node.inputs.get("text", "") if node.type in FRONTEND_ONLY else ""),
            "flags": {}, "order": order.index(key), "mode": 0, "inputs": inputs, "outputs": [],
            "properties": properties(node.type, definition),
            "widgets_values": widget_values(wf, node, widgets),
        }
        if node.title:
            layouts[key]["title"] = node.title

    for key, node in wf.nodes.items():
        definition = defs[key]
        layouts[key]["outputs"] = [
            {"name": name, "type": out_type, "links": outputs_links.get((key, i), []), "slot_index": i}
            for i, (name, out_type) in enumerate(zip(definition.get("output_name", []), definition.get("output", [])))]
    place(wf, layouts)
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"id-animator/workflows/{wf.name}")),
        "revision": 0, "last_node_id": len(wf.nodes), "last_link_id": len(links),
        "nodes": list(layouts.values()), "links": links, "groups": [], "config": {},
        "extra": {"ds": {"scale": 0.7, "offset": [40, 40]}}, "version": 0.4,
    }


def connect(wf: Workflow, key: str, slot: Slot, target_slot: int, source: Out, nodes: dict[str, Node],
            defs: dict[str, dict[str, Any]], ids: dict[str, int], links: list, outputs_links: dict) -> int:
    where = f"{wf.name}/{key} ({nodes[key].type}).{slot.name}"
    source_def = defs[source.node]
    names = list(source_def.get("output_name", []))
    if source.name not in names:
        raise SpecError(f"{where}: {nodes[source.node].type} has no output {source.name!r} (has {names})")
    origin_slot = names.index(source.name)
    out_type = source_def["output"][origin_slot]
    if slot.is_widget:
        raise SpecError(f"{where}: a widget input cannot take a link here; give it a value")
    if not types_connect(out_type, slot.type):
        raise SpecError(f"{where}: {out_type} output cannot feed a {slot.type} input")
    link_id = len(links) + 1
    links.append([link_id, ids[source.node], origin_slot, ids[key], target_slot, out_type])
    outputs_links.setdefault((source.node, origin_slot), []).append(link_id)
    return link_id


def place(wf: Workflow, layouts: dict[str, dict[str, Any]]) -> None:
    """Columns left to right in spec order; nodes stacked top to bottom within a column."""
    columns: dict[int, list[str]] = {}
    for key, node in wf.nodes.items():
        columns.setdefault(node.column, []).append(key)
    x = 0
    for column in sorted(columns):
        y = 0
        for key in columns[column]:
            layouts[key]["pos"] = [x, y]
            y += layouts[key]["size"][1] + TITLE_HEIGHT + ROW_GAP
        x += max(layouts[k]["size"][0] for k in columns[column]) + COLUMN_GAP
