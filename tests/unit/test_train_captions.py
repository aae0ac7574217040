"""Captions (paper §3.3.1): sidecar files, CSV and JSONL manifests, the merge template, missing ones."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from id_animator.adapter.errors import TrainingError
from id_animator.train import cli
from id_animator.train.captions import check_template, load_captions, merge_caption, read_manifest


def _captions(*args: str | Path) -> int:
    return cli.main(["captions", *map(str, args)])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _touch(path: Path, text: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("" if text is None else text, encoding="utf-8")
    return path


@pytest.fixture()
def videos(tmp_path: Path) -> Path:
    """a: unified + parts; b: both parts; c: action only; sub/e: unified; d: nothing; f: empty file.
    The captioner never decodes a video, so empty .mp4 files do."""
    folder = tmp_path / "videos"
    for name in ("a", "b", "c", "d", "f", "sub/e"):
        _touch(folder / f"{name}.mp4")
    _touch(folder / "a.txt", "A woman talks to the camera.\n")
    _touch(folder / "a.attribute.txt", "a woman")
    _touch(folder / "b.attribute.txt", "  A young man with short brown hair and glasses.\n")
    _touch(folder / "b.action.txt", "He  smiles,\nthen turns his head.")
    _touch(folder / "c.action.txt", "dancing.")
    _touch(folder / "sub" / "e.txt", "an old man reading")
    _touch(folder / "f.txt", "  \n")
    return folder


# ----------------------------------------------------------------------------- the template

@pytest.mark.parametrize("attribute, action, template, expected", [
    ("A woman with blond hair.", "She smiles and nods.", "{attribute}, {action}",
     "A woman with blond hair, She smiles and nods"),
    ("  a man ,  ", "walks .", "{attribute}, {action}", "a man, walks"),
    (None, "walks.", "{attribute}, {action}", "walks"),
    ("a man", "", "{attribute}, {action}", "a man"),
    ("a man.", "talking", "a photo of {attribute}; {action}.", "a photo of a man; talking."),
    ("a man", None, "a photo of {attribute}; {action}.", "a photo of a man."),
    ("a man", "he talks!", "{attribute}. {action}", "a man. he talks!"),
    ("a  man\nwith a hat", "talks", "{action} ({attribute})", "talks (a man with a hat)"),
])
def test_merge_template(attribute, action, template, expected) -> None:
    assert merge_caption(attribute, action, template) == expected


def test_merge_of_nothing_is_no_caption() -> None:
    assert merge_caption(None, None) is None
    assert merge_caption(" ", "\n") is None


@pytest.mark.parametrize("template", ["{who}, {action}", "no fields", "{attribute", "{0}"])
def test_bad_templates_are_refused(template: str) -> None:
    with pytest.raises(TrainingError, match="template"):
        check_template(template)


# ----------------------------------------------------------------------------- sidecar files

def test_sidecar_captions(videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "captions.jsonl"
    assert _captions(videos, "--out", out, "--allow-missing") == 0
    rows = {row["id"]: row for row in _rows(out)}
    assert list(rows) == ["a", "b", "c", "sub/e"]  # d has nothing, f an empty file
    assert rows["a"] == {"id": "a", "caption": "A woman talks to the camera.", "attribute": "a woman",
                         "action": None}  # a unified caption wins over the parts
    assert rows["b"]["caption"] == "A young man with short brown hair and glasses, He smiles, then turns his head"
    assert rows["b"]["attribute"] == "A young man with short brown hair and glasses."
    assert rows["c"] == {"id": "c", "caption": "dancing", "attribute": None, "action": "dancing."}
    assert load_captions(out) == {video_id: row["caption"] for video_id, row in rows.items()}
    captured = capsys.readouterr()
    assert "no caption: d" in captured.err and "no caption: f" in captured.err
    assert (tmp_path / "captions.missing.txt").read_text().split() == ["d", "f"]
    assert "4 videos, 2 without caption left out" in captured.out


def test_missing_captions_fail_without_allow_missing(videos: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "captions.jsonl"
    assert _captions(videos, "--out", out) == 1
    err = capsys.readouterr().err
    assert "error: 2 of 6 videos have no caption (e.g. d): give d.txt" in err and "--allow-missing" in err
    assert not out.exists()
    for name in ("d", "f"):
        _touch(videos / f"{name}.attribute.txt", f"person {name}")
    assert _captions(videos, "--out", out) == 0
    assert load_captions(out)["d"] == "person d"
    assert not (tmp_path / "captions.missing.txt").exists()


def test_template_option(videos: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    assert _captions(videos, "--out", out, "--allow-missing", "--template", "{action}, by {attribute}.") == 0
    assert load_captions(out)["b"] == ("He smiles, then turns his head, by A young man with short brown "
                                       "hair and glasses.")
    assert _captions(videos, "--out", out, "--template", "{person}") == 1


# ----------------------------------------------------------------------------- manifests

def test_csv_manifest(videos: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "captions.csv"
    # a spreadsheet's export: BOM, capitalised headers, a quoted caption with commas, a path column
    manifest.write_text("\ufeffVideo,Attribute,Action,Caption\n"
                        "videos/b.mp4,a man,\"waves, then laughs\",\n"
                        "videos/d.mp4,\"a girl, smiling\",running,\n"
                        "videos/sub/e.mp4,,,\"a reader, slowly\"\n"
                        "videos/f.mp4,,,\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert _captions(videos, "--manifest", manifest, "--out", out, "--allow-missing") == 0
    captions = load_captions(out)
    assert captions["b"] == "a man, waves, then laughs"  # the manifest row wins over the sidecars
    assert captions["d"] == "a girl, smiling, running"
    assert captions["sub/e"] == "a reader, slowly"
    assert "f" not in captions  # an empty row falls back to the sidecar, which is blank too
    assert captions["a"] == "A woman talks to the camera."  # no row: the sidecar
    assert captions["c"] == "dancing"


def test_jsonl_manifest_alone(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"id": "celebv/x1", "attribute": "a man", "action": "talks"}) + "\n\n"
                        + json.dumps({"ID": "celebv/x2", "caption": "  a woman  sings "}) + "\n")
    out = tmp_path / "out.jsonl"
    assert _captions("--manifest", manifest, "--out", out) == 0
    assert _rows(out) == [{"id": "celebv/x1", "caption": "a man, talks", "attribute": "a man", "action": "talks"},
                          {"id": "celebv/x2", "caption": "a woman sings", "attribute": None, "action": None}]


@pytest.mark.parametrize("content, message", [
    ('{"id": "a", "caption": "x"}\n{"id": "a", "caption": "y"}\n', ":2: a second row for video 'a'"),
    ('{"id": "a", "caption": "x"}\nnot json\n', ":2: not a JSON object"),
    ('["a", "x"]\n', ":1: each line must be a JSON object"),
    ('{"caption": "x"}\n', ":1: no `id` or `video`"),
    ('{"id": "a", "text": "x"}\n', ":1: no `caption`, `attribute` or `action`"),
])
def test_bad_manifests_name_the_line(content: str, message: str, tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(content)
    with pytest.raises(TrainingError, match=message):
        read_manifest(manifest)


def test_bad_csv_and_other_suffixes(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,caption\na,one, two\n")
    with pytest.raises(TrainingError, match=r"m.csv:2: more fields than the header.*quote"):
        read_manifest(manifest)
    other = tmp_path / "m.xlsx"
    other.write_bytes(b"PK")
    with pytest.raises(TrainingError, match="must be a .csv or .jsonl"):
        read_manifest(other)
    with pytest.raises(TrainingError, match="does not exist"):
        read_manifest(tmp_path / "nowhere.csv")


# ----------------------------------------------------------------------------- reading back, CLI

def test_load_captions_errors(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist; make it with"):
        load_captions(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "caption": "x"}\n{"id": "b"}\n')
    with pytest.raises(TrainingError, match="bad.jsonl:2: not a captions row"):
        load_captions(bad)


def test_cli_help_and_no_input(import_root: Path, tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "id_animator.train", "captions", *args], env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    done = run("--help")
    assert done.returncode == 0 and "--manifest" in done.stdout and "--allow-missing" in done.stdout
    done = run("--out", "c.jsonl")
    assert done.returncode == 1 and "error: Give the videos" in done.stderr
    done = run(str(tmp_path / "missing"), "--out", "c.jsonl")
    assert done.returncode == 1 and "does not exist" in done.stderr and "Traceback" not in done.stderr
