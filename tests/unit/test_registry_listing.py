"""The Comfy registry listing (issue 19, item 7): the `[tool.comfy]` fields a listing needs, an
icon that exists in the repository, a publish workflow with the registry's own action that
publishes only a new version, and a README that does not claim the pack is published yet."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
RAW_URL = re.compile(r"https://raw\.githubusercontent\.com/(?P<repo>[^/]+/[^/]+)/main/(?P<path>.+)")


def test_tool_comfy_has_what_a_listing_needs():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert re.fullmatch(r"[a-z][a-z0-9-]*", project["name"]) and "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    assert project["urls"]["Repository"].startswith("https://github.com/")
    assert comfy["PublisherId"] and comfy["DisplayName"] == "ID-Animator"
    assert comfy["requires-comfyui"] == ">=0.30.0"
    assert isinstance(comfy["includes"], list) and all((REPO / path).exists() for path in comfy["includes"])


def test_icon_is_a_square_png_of_this_repository():
    icon = RAW_URL.fullmatch(PYPROJECT["tool"]["comfy"]["Icon"])
    assert icon, "Icon must be a raw URL of a file on main"
    assert PYPROJECT["project"]["urls"]["Repository"].endswith("/" + icon["repo"])
    with Image.open(REPO / icon["path"]) as image:
        assert image.format == "PNG" and image.width == image.height <= 400


def test_publish_workflow_uses_the_registry_action_on_a_new_version():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "publish.yml").read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert triggers["push"] == {"branches": ["main"], "paths": ["pyproject.toml"]} and "workflow_dispatch" in triggers
    steps = workflow["jobs"]["publish-node"]["steps"]
    publish = next(s for s in steps if s.get("uses", "").startswith("Comfy-Org/publish-node-action@"))
    assert publish["with"]["personal_access_token"] == "${{ secrets.REGISTRY_ACCESS_TOKEN }}"
    assert "steps.version.outputs.changed == 'true'" in publish["if"]
    check = next(s for s in steps if s.get("id") == "version")
    assert "github.event.before" in check["env"]["BEFORE"] and '["project"]["version"]' in check["run"]


def test_readme_does_not_claim_a_release():
    readme = (REPO / "README.md").read_text()
    assert 'install "ID-Animator" from ComfyUI-Manager' not in readme
    assert "not published yet" in readme and ".github/workflows/publish.yml" in readme
