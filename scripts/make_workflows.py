"""Generate workflows/*.json (UI format), their thumbnails and docs/gallery.md from workflow_spec.py.

Why a live server: the frontend builds widgets from `/object_info`, so the generator reads the same
definitions (our nodes and ComfyUI core) from a real ComfyUI instead of restating them. By default
it starts `main.py --cpu` from the ComfyUI tree in $IDA_COMFYUI (or --comfyui) with this pack in a
throw-away base folder; `--url` uses a running server instead. Third-party nodes come from the
pinned table in workflow_spec.py (they need not be installed).

    python scripts/make_workflows.py                       # write workflows/ and docs/gallery.md
    python scripts/make_workflows.py --check               # exit 1 if the files are out of date
    python scripts/make_workflows.py --third-party DIR...  # also load those pack checkouts and
                                                           # verify the table against them
    python scripts/make_workflows.py --thumbnails          # render workflows/<name>.jpg in Chromium

Thumbnails are screenshots of each workflow loaded in the real frontend; give --third-party
checkouts too, or third-party nodes are drawn as missing. The pinned commits are in
workflow_spec.PACKS (`git clone` each repository and check out that commit).

Run it with the Python that runs ComfyUI (scripts/test's venv); thumbnails need Chromium
($IDA_CHROMIUM or --chromium) and Python playwright.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ui_format import SpecError, slots, to_ui
from workflow_spec import INPUTS, MODELS, PACKS, THIRD_PARTY, all_workflows

REPO = Path(__file__).resolve().parent.parent
WORKFLOW_DIR = REPO / "workflows"
GALLERY = REPO / "docs" / "gallery.md"
PACK_FOLDER = "id_animator"
THUMBNAIL_MAX_BYTES = 100_000


def build_all(object_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """name -> UI-format workflow, for every workflow in the spec."""
    return {wf.name: to_ui(wf, object_info) for wf in all_workflows()}


def dump(workflow: dict[str, Any]) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def stale_files(object_info: dict[str, Any]) -> list[str]:
    """Workflow files whose content differs from what the spec generates now (or that are missing)."""
    stale = []
    for name, workflow in build_all(object_info).items():
        path = WORKFLOW_DIR / f"{name}.json"
        if not path.exists() or json.loads(path.read_text()) != json.loads(dump(workflow)):
            stale.append(path.name)
    if not GALLERY.exists() or GALLERY.read_text() != gallery_markdown():
        stale.append(str(GALLERY.relative_to(REPO)))
    return stale


def comparable(definition: dict[str, Any]) -> list[tuple]:
    """What the frontend uses from a definition: input kinds, order, limits, non-file options, outputs."""
    rows: list[tuple] = []
    for slot in slots(definition):
        limits = tuple(sorted((k, v) for k, v in slot.options.items() if k in ("default", "min", "max", "step")))
        choices = None if slot.options.get("files") else (tuple(slot.choices) if slot.choices is not None else None)
        rows.append((slot.name, slot.type, slot.optional, limits, choices))
    rows.append(("outputs", tuple(definition.get("output", [])), tuple(definition.get("output_name", []))))
    return rows


def third_party_mismatches(object_info: dict[str, Any]) -> list[str]:
    """Differences between the pinned table and live definitions of the same nodes."""
    problems = []
    for node_type, table in THIRD_PARTY.items():
        live = object_info.get(node_type)
        if live is None:
            problems.append(f"{node_type}: not loaded by the server (is the {table['pack']} checkout given?)")
            continue
        for mine, theirs in zip(comparable(table), comparable(_files_marked(live, table))):
            if mine != theirs:
                problems.append(f"{node_type}: table {mine} != source {theirs}")
        if len(comparable(table)) != len(comparable(live)):
            problems.append(f"{node_type}: table has {len(comparable(table))} rows, source {len(comparable(live))}")
    return problems


def _files_marked(live: dict[str, Any], table: dict[str, Any]) -> dict[str, Any]:
    """Copy the table's {"files": folder} marks onto the live definition (its options are files on disk)."""
    marked = json.loads(json.dumps(live))
    for section, inputs in table["input"].items():
        for name, spec in inputs.items():
            if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("files"):
                live_spec = marked["input"].get(section, {}).get(name)
                if live_spec is not None:
                    if len(live_spec) < 2:
                        live_spec.append({})
                    live_spec[1]["files"] = spec[1]["files"]
    return marked


def gallery_markdown() -> str:
    """The README gallery section: each workflow, its thumbnail, the packs and files it needs."""
    workflows = all_workflows()
    common = [name for name in workflows[0].files() if name in MODELS and all(name in wf.files() for wf in workflows)]

    def row(name: str) -> str:
        model = MODELS[name]
        return f"| `{name}` | `models/{model.folder}/` | {model.what} | {model.source} |"

    lines = ["## Workflow gallery", "",
             ("Shared workflows live in [`workflows/`](workflows/); ComfyUI also lists them under "
              "*Templates -> Extensions* (the pack's folder name). Each opens with a note saying what to change."), "",
             "Every workflow needs:", "", "| file | goes in | what | from |", "|---|---|---|---|",
             *[row(name) for name in common], ""]
    extra_models: list[str] = []
    for wf in workflows:
        packs = sorted({THIRD_PARTY[t]["pack"] for t in wf.node_types() if t in THIRD_PARTY})
        models = [n for n in wf.files() if n in MODELS and n not in common]
        inputs = [n for n in wf.files() if n in INPUTS]
        extra_models += [n for n in models if n not in extra_models]
        lines += [f"### {wf.title}", "",
                  f"[![{wf.name}](workflows/{wf.name}.jpg)](workflows/{wf.name}.json)", "",
                  f"[`{wf.name}.json`](workflows/{wf.name}.json): {wf.summary}", "",
                  "- Custom nodes: this pack" + "".join(f", [{p}](https://github.com/{PACKS[p][1]})" for p in packs)
                  + (" (core ComfyUI otherwise; this one runs in CI)." if wf.runs_in_ci else "."),
                  "- Also needs: " + (", ".join(f"`{n}` in `models/{MODELS[n].folder}/`" for n in models) or "nothing else")
                  + ".",
                  "- Inputs: " + "; ".join(f"`{n}`: {INPUTS[n]}" for n in inputs) + ".", ""]
    lines += ["Other model files:", "", "| file | goes in | what | from |", "|---|---|---|---|",
              *[row(name) for name in extra_models], "",
              "The workflows are generated by `scripts/make_workflows.py` from `scripts/workflow_spec.py`; "
              "third-party widget lists were checked against "
              + " and ".join(f"[{p}](https://github.com/{repo}) `{c[:10]}`" for p, (_, repo, c) in PACKS.items())
              + ".", ""]
    return "\n".join(lines)


def add_placeholder_files(base: Path) -> None:
    """Every file the workflows name, as an empty stand-in (listed by the loaders, never loaded), so
    that thumbnails show no 'missing model' marks. Input pictures get a labelled grey image."""
    from PIL import Image, ImageDraw

    for model in MODELS.values():
        path = base / "models" / model.folder / model.name
        if model.folder.startswith("insightface"):
            path.mkdir(parents=True, exist_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    (base / "input").mkdir(exist_ok=True)
    for name in INPUTS:
        path = base / "input" / name
        if name.endswith(".png"):
            image = Image.new("RGB", (256, 256), (92, 96, 104))
            ImageDraw.Draw(image).text((16, 120), name, fill=(235, 235, 235))
            image.save(path)
        else:
            write_placeholder_video(path)


def write_placeholder_video(path: Path, frames: int = 16, size: int = 64) -> None:
    """A short grey H.264 clip (PyAV ships with ComfyUI), so video loaders can preview it."""
    import av
    import numpy as np

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            pixels = np.full((size, size, 3), 60 + 8 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as reply:
        return json.loads(reply.read())


@contextlib.contextmanager
def comfyui_server(comfyui: Path, extra_packs: list[Path]) -> Iterator[str]:
    """`main.py --cpu` with this pack (and `extra_packs`) in a throw-away base folder; yields its URL."""
    with tempfile.TemporaryDirectory(prefix="make-workflows-") as tmp, open(Path(tmp) / "comfyui.log", "w+") as log:
        base = Path(tmp)
        (base / "custom_nodes").mkdir()
        add_placeholder_files(base)
        for target, name in [(REPO, PACK_FOLDER)] + [(p.resolve(), p.resolve().name) for p in extra_packs]:
            (base / "custom_nodes" / name).symlink_to(target, target_is_directory=True)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, str(comfyui / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--base-directory", str(base), "--disable-api-nodes", "--disable-auto-launch"],
            cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 180
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"ComfyUI did not start:\n{log.read()[-3000:]}")
                try:
                    get_json(url + "/system_stats")
                    break
                except OSError:
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_thumbnails(url: str, chromium: str) -> None:
    from workflow_browser import THUMBNAIL_SETTINGS, open_comfyui, render_thumbnail

    with open_comfyui(url, chromium, settings=THUMBNAIL_SETTINGS, viewport={"width": 2000, "height": 1250}) as page:
        for wf in all_workflows():
            path = WORKFLOW_DIR / f"{wf.name}.jpg"
            render_thumbnail(page, json.loads((WORKFLOW_DIR / f"{wf.name}.json").read_text()), path)
            size = path.stat().st_size
            if size > THUMBNAIL_MAX_BYTES:
                raise RuntimeError(f"{path.name} is {size} bytes (limit {THUMBNAIL_MAX_BYTES})")
            print(f"wrote {path.relative_to(REPO)} ({size // 1024} KB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("IDA_COMFYUI"),
                        help="ComfyUI source tree to start (default $IDA_COMFYUI)")
    parser.add_argument("--url", help="use this running ComfyUI (with this pack) instead of starting one")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if files are stale")
    parser.add_argument("--third-party", type=Path, nargs="+", default=[],
                        help="checkouts of AnimateDiff-Evolved / Advanced-ControlNet to load and verify the table "
                             "against (with --url, the table is verified whenever that server has them)")
    parser.add_argument("--thumbnails", action="store_true", help="render workflows/<name>.jpg in Chromium")
    parser.add_argument("--chromium", default=os.environ.get("IDA_CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.url:
            url = args.url.rstrip("/")
        else:
            if not args.comfyui:
                parser.error("give --comfyui DIR (or set IDA_COMFYUI), or --url of a running server")
            url = stack.enter_context(comfyui_server(Path(args.comfyui), args.third_party))
        object_info = get_json(url + "/object_info")
        status = 0
        if args.third_party or any(node_type in object_info for node_type in THIRD_PARTY):
            problems = third_party_mismatches(object_info)
            print("\n".join(problems) or f"third-party table matches the given checkouts ({len(THIRD_PARTY)} nodes)")
            status |= bool(problems)
        try:
            if args.check:
                stale = stale_files(object_info)
                print("stale: " + ", ".join(stale) if stale else "workflows are up to date")
                return status | bool(stale)
            WORKFLOW_DIR.mkdir(exist_ok=True)
            for name, workflow in build_all(object_info).items():
                (WORKFLOW_DIR / f"{name}.json").write_text(dump(workflow))
                print(f"wrote workflows/{name}.json")
            GALLERY.parent.mkdir(exist_ok=True)
            GALLERY.write_text(gallery_markdown())
            print(f"wrote {GALLERY.relative_to(REPO)}")
        except SpecError as e:
            print(f"workflow_spec.py: {e}", file=sys.stderr)
            return 2
        if args.thumbnails:
            if not args.chromium:
                parser.error("--thumbnails needs Chromium: set IDA_CHROMIUM or pass --chromium")
            write_thumbnails(url, args.chromium)
        return status


if __name__ == "__main__":
    sys.exit(main())
