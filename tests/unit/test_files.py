"""adapter/files.py: atomic writes, the tolerant JSONL reader, the settings guard, and the loss
log of `train` resumed after a crash in the middle of appending a row."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from id_animator.adapter.errors import TrainingError
from id_animator.adapter.files import (
    append_jsonl, atomic_path, read_jsonl, refuse_other_settings, write_atomic,
)

pytestmark = pytest.mark.unit


def test_write_atomic_replaces_whole_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "sub" / "a.json"
    write_atomic(target, "old\n")
    write_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n"
    assert [p.name for p in target.parent.iterdir()] == ["a.json"]


def test_a_failed_writer_leaves_the_old_file(tmp_path: Path):
    target = tmp_path / "a.safetensors"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".tmp" and tmp.name.endswith(".safetensors.tmp") and tmp.parent == tmp_path
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]


def test_a_torn_last_line_is_dropped(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    append_jsonl(path, [{"step": 1}, {"step": 2}])
    with path.open("a") as f:
        f.write('{"step": 3, "lo')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_a_bad_line_in_the_middle_names_file_line_and_fix(tmp_path: Path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(TrainingError, match=r"rows\.jsonl:2: the index is damaged .*; delete it\."):
        read_jsonl(path, what="index", fix="delete it")


def test_other_settings_are_refused_with_each_difference(tmp_path: Path):
    path = tmp_path / "meta.json"
    refuse_other_settings(path, {"size": 16, "seed": 0}, what="The cache", fix="Use another folder.")
    assert json.loads(path.read_text()) == {"size": 16, "seed": 0}
    refuse_other_settings(path, {"size": 16, "seed": 0}, what="The cache", fix="Use another folder.")
    with pytest.raises(TrainingError, match=r"^The cache was made with other settings: size 16 \(now 32\), "
                                            r"seed 0 \(now 1\)\. Use another folder\.$"):
        refuse_other_settings(path, {"size": 32, "seed": 1}, what="The cache", fix="Use another folder.")
    # only the listed keys decide
    refuse_other_settings(path, {"size": 16, "seed": 5}, what="The cache", fix="-", keys=["size"])


def test_resume_after_a_crash_mid_append_to_the_loss_log(tmp_path: Path):
    """`train --resume` reads the loss log first (truncate_loss_log): a row cut short by the crash
    used to stop it with a JSONDecodeError traceback."""
    pytest.importorskip("einops")
    from id_animator.train.loop import read_loss_log, truncate_loss_log

    log = tmp_path / "loss.jsonl"
    append_jsonl(log, [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)])
    with log.open("a") as f:
        f.write('{"step": 4, "loss": 0.2')  # the crash
    truncate_loss_log(log, step=2)  # the saved state was step 2
    assert [row["step"] for row in read_loss_log(log)] == [1, 2]
    assert log.read_text().endswith("}\n")  # whole lines again: the resumed run appends cleanly
    append_jsonl(log, [{"step": 3, "loss": 0.3}])
    assert [row["step"] for row in read_loss_log(log)] == [1, 2, 3]
