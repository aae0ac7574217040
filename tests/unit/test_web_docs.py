"""web/docs/<node_id>.md: one help page per node, naming every input, with typical values and
common failures. Node ids and input names are read from the node sources (no ComfyUI needed)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"


def node_schemas() -> dict[str, list[str]]:
    """node_id -> input names, from every `io.Schema(node_id=..., inputs=[X.Input("name", ...), ...])`."""
    schemas = {}
    for path in sorted((REPO / "nodes").glob("*.py")):
        for call in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "Schema"):
                continue
            keywords = {k.arg: k.value for k in call.keywords}
            node_id = ast.literal_eval(keywords["node_id"])
            inputs = [item.args[0].value for item in keywords["inputs"].elts
                      if isinstance(item, ast.Call) and getattr(item.func, "attr", None) == "Input"]
            schemas[node_id] = inputs
    return schemas


SCHEMAS = node_schemas()


def test_the_four_contract_nodes_are_found():
    assert {"LoadIDAnimator", "FaceEncode", "IDMix", "ApplyFaceAdapter"} <= set(SCHEMAS)
    assert SCHEMAS["IDMix"] == ["embeds_a", "embeds_b", "blend", "blend_end"]


def test_one_page_per_node_and_no_stale_pages():
    assert {p.stem for p in DOCS.glob("*.md")} == set(SCHEMAS)


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_names_every_input(node_id):
    text = (DOCS / f"{node_id}.md").read_text()
    mentioned = set(re.findall(r"`([a-z_]+)`", text))
    missing = [name for name in SCHEMAS[node_id] if name not in mentioned]
    assert not missing, f"web/docs/{node_id}.md does not mention {missing} (as `name`)"


@pytest.mark.parametrize("node_id", sorted(SCHEMAS))
def test_page_has_inputs_values_and_failures(node_id):
    text = (DOCS / f"{node_id}.md").read_text()
    headings = re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)
    assert headings and headings[0].strip(), "a title first"
    assert "Inputs" in headings and "Common failures" in headings, headings
    table = text.split("## Inputs", 1)[1].split("\n## ", 1)[0]
    assert "| typical value |" in table
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [re.match(r"\| `([a-z_]+)`", row).group(1) for row in rows] == SCHEMAS[node_id], \
        "the Inputs table lists the inputs in schema order"
    failures = text.split("## Common failures", 1)[1]
    assert failures.count("\n- ") >= 2, "at least two common failures with their fix"
