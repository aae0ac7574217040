"""`caption` (paper §3.3.1) with tiny random models of the real transformers classes, loaded by path:
LLaVA-1.5 (ShareGPT4V) for attributes, Video-LLaVA for actions, a causal LM for the merge; Qwen2-VL
and Qwen2.5-VL for both; a local OpenAI-compatible stub server for the endpoint path. The models' words are
random: the tests check which frames reach which model, batching, resume, shards, the stored
settings, the caption lengths against CLIP's 77 tokens, and that `captions` reads the output."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from id_animator.adapter.errors import TrainingError
from id_animator.train import caption, cli
from id_animator.train.caption_length import LIMIT, measure
from id_animator.train.captions import load_captions
from support import tiny_vlms
from support.openai_stub import StubServer
from support.videos import indexed_frames, read_index, write_video

LENGTHS = {"a": 20, "b": 9, "c": 5}  # frames per video; c is shorter than the 8 action frames


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vlms")
    return {"llava": tiny_vlms.write_llava(root / "llava-1.5"),
            "video_llava": tiny_vlms.write_video_llava(root / "video-llava"),
            "qwen2_vl": tiny_vlms.write_qwen2_vl(root / "qwen2-vl"),
            "qwen2_5_vl": tiny_vlms.write_qwen2_5_vl(root / "qwen2.5-vl"),
            "lm": tiny_vlms.write_causal_lm(root / "merge-lm")}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for seed, (name, count) in enumerate(LENGTHS.items()):
        write_video(folder / f"{name}.mp4", indexed_frames(count, size=(64, 160), seed=seed))
    return folder


@pytest.fixture(scope="module")
def tokenizer_dir(comfyui_dir: Path) -> Path:
    return comfyui_dir / "comfy" / "sd1_tokenizer"


class Recorder:
    """Wraps each model the command opens; records the frame indices and prompts it is given."""

    def __init__(self, monkeypatch) -> None:
        self.opened: list[str] = []
        self.calls: list[tuple[str, str, list]] = []  # (model, "describe"/"complete", per-item payload)
        real = caption.open_model

        def open_model(model, endpoint, **options):
            self.opened.append(Path(model).name)
            inner = real(model, endpoint, **options)
            recorder = self

            class Recorded:
                name, can_see, can_see_video = inner.name, inner.can_see, inner.can_see_video

                def describe(self, items, prompt):
                    recorder.calls.append((Path(model).name, "describe",
                                           [[read_index(frame) for frame in frames] for frames in items]))
                    return inner.describe(items, prompt)

                def complete(self, prompts):
                    recorder.calls.append((Path(model).name, "complete", list(prompts)))
                    return inner.complete(prompts)

            return Recorded()

        monkeypatch.setattr(caption, "open_model", open_model)

    def by(self, model: str, kind: str) -> list[list]:
        return [payload for name, k, payload in self.calls if name == model and k == kind]


def _caption(videos: Path, out: Path, *args: str | Path) -> int:
    return cli.main(["caption", str(videos), "--out", str(out), "--device", "cpu", "--max-new-tokens", "12",
                     *map(str, args)])


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _paper_args(models: dict[str, Path], tokenizer_dir: Path) -> list:
    return ["--attribute-model", models["llava"], "--action-model", models["video_llava"],
            "--merge-model", models["lm"], "--batch-size", "2", "--tokenizer", tokenizer_dir]


def test_frame_plan_spreads_action_frames_and_takes_the_middle_frame() -> None:
    assert caption.frame_plan(20, 0.5, 8) == (10, [0, 3, 5, 8, 11, 14, 16, 19])
    assert caption.frame_plan(5, 0.5, 8) == (2, [0, 1, 1, 2, 2, 3, 3, 4])  # repeated: Video-LLaVA needs 8
    assert caption.frame_plan(9, 0.0, 4)[0] == 0 and caption.frame_plan(9, 1.0, 4)[0] == 8


@pytest.fixture(scope="module")
def paper_run(models, videos, tokenizer_dir, tmp_path_factory) -> tuple[Path, "Recorder", str]:
    """One run of the paper's three models (LLaVA-1.5, Video-LLaVA, a causal LM), batches of 2:
    (its output, what each model was given, what it printed)."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("paper") / "captions.jsonl"
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        recorder = Recorder(patch)
        assert _caption(videos, out, *_paper_args(models, tokenizer_dir)) == 0
    return out, recorder, printed.getvalue()


def test_paper_models_frames_batches_settings_and_captions_feed(paper_run, models, tokenizer_dir,
                                                                tmp_path) -> None:
    out, recorder, printed = paper_run
    rows = _rows(out)
    assert [row["id"] for row in rows] == ["a", "b", "c"]
    assert recorder.opened == ["llava-1.5", "video-llava", "merge-lm"]
    # batches of 2 then 1, to each model; the attribute model sees one frame, the video model 8
    attribute_calls = recorder.by("llava-1.5", "describe")
    action_calls = recorder.by("video-llava", "describe")
    assert [len(call) for call in attribute_calls] == [len(call) for call in action_calls] == [2, 1]
    for row, seen in zip(rows, sum(attribute_calls, [])):
        plan = caption.frame_plan(LENGTHS[row["id"]], 0.5, 8)
        assert row["frames"] == {"attribute": plan[0], "action": plan[1]}
        assert seen == [plan[0]]
    assert sum(action_calls, []) == [row["frames"]["action"] for row in rows]
    # the merge prompt carries both parts of each video
    prompts = sum(recorder.by("merge-lm", "complete"), [])
    assert len(prompts) == 3
    for row, prompt in zip(rows, prompts):
        assert prompt == caption.MERGE_PROMPT.format(attribute=row["attribute"] or "(none)",
                                                     action=row["action"] or "(none)")
    settings = json.loads(out.with_name(out.name + ".settings.json").read_text())
    assert settings["attribute_model"] == str(models["llava"]) and settings["merge_model"] == str(models["lm"])
    assert settings["merge_prompt"] == caption.MERGE_PROMPT and settings["template"] is None
    # lengths measured with the CLIP tokenizer; an LLM merge names no part
    captioned = [row for row in rows if row["caption"]]
    for row in captioned:
        assert row["tokens"] == measure(row["caption"], caption.caption_length.open_tokenizer(tokenizer_dir)).tokens
        assert row["truncated"] == (row["tokens"] > LIMIT) and "cut" not in row
    assert "caption length:" in printed and f"{len(rows)} videos (0 resumed)" in printed
    # the output feeds `captions` and training's captions file reader
    merged = tmp_path / "merged.jsonl"
    assert cli.main(["captions", "--manifest", str(out), "--out", str(merged), "--allow-missing",
                     "--tokenizer", str(tokenizer_dir)]) == 0
    assert load_captions(merged) == {row["id"]: row["caption"] for row in captioned}
    assert {k: v for k, v in load_captions(out).items() if v} == load_captions(merged)


def test_resume_after_an_interruption_and_refuse_other_settings(paper_run, models, videos, tokenizer_dir,
                                                                tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "captions.jsonl"
    for suffix in ("", ".settings.json"):
        shutil.copy(str(paper_run[0]) + suffix, str(out) + suffix)
    full = _rows(out)
    lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")  # killed while writing b
    recorder = Recorder(monkeypatch)
    assert _caption(videos, out, *_paper_args(models, tokenizer_dir)) == 0
    assert sum(recorder.by("llava-1.5", "describe"), []) == [[full[1]["frames"]["attribute"]],
                                                             [full[2]["frames"]["attribute"]]]
    assert _rows(out) == full  # greedy decoding: the resumed rows equal the first run's
    assert "3 videos (1 resumed)" in capsys.readouterr().out
    with pytest.raises(TrainingError, match="action_frames"):
        caption.run(cli.build_parser("caption").parse_args(
            ["caption", str(videos), "--out", str(out), "--action-frames", "4", "--device", "cpu",
             "--max-new-tokens", "12", *map(str, _paper_args(models, tokenizer_dir))]))


def test_shards_split_the_videos(models, videos, tokenizer_dir, tmp_path) -> None:
    ids = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / f"captions.{shard[0]}.jsonl"
        assert _caption(videos, out, "--attribute-model", models["qwen2_5_vl"], "--shard", shard,
                        "--tokenizer", tokenizer_dir) == 0
        ids.append([row["id"] for row in _rows(out)])
    assert ids == [["a", "c"], ["b"]]


def test_one_qwen2_vl_for_both_with_the_template_merge(models, videos, tokenizer_dir, tmp_path, monkeypatch,
                                                       capsys) -> None:
    recorder = Recorder(monkeypatch)
    out = tmp_path / "captions.jsonl"
    assert _caption(videos, out, "--attribute-model", models["qwen2_vl"], "--action-frames", "4",
                    "--max-new-tokens", "60", "--tokenizer", tokenizer_dir) == 0
    assert recorder.opened == ["qwen2-vl"]  # loaded once, used for images and videos
    calls = recorder.by("qwen2-vl", "describe")
    assert [len(items[0]) for items in calls] == [1, 4]
    rows = _rows(out)
    truncated = [row for row in rows if row.get("truncated")]
    for row in rows:
        if row["caption"] and row["attribute"] and row["action"]:
            assert row["caption"].startswith(row["attribute"].rstrip(" .,;:"))
    for row in truncated:  # the template puts the attribute first: the action loses words first
        assert row["cut"] and "action" in row["cut"]
    printed = capsys.readouterr().out
    print(f"qwen2-vl template merge: {len(truncated)} of {len(rows)} captions cut at {LIMIT} tokens")
    if truncated:
        assert f"{len(truncated)} of {len(rows)} captions are cut" in printed
        assert (out.parent / "captions.truncated.txt").read_text().count("\n") == len(truncated)


def test_an_image_model_cannot_caption_actions(models, videos, tmp_path) -> None:
    with pytest.raises(TrainingError, match="images only"):
        caption.run(cli.build_parser("caption").parse_args(
            ["caption", str(videos), "--out", str(tmp_path / "c.jsonl"), "--device", "cpu",
             "--attribute-model", str(models["llava"])]))


def test_openai_compatible_endpoint(videos, tokenizer_dir, tmp_path) -> None:
    out = tmp_path / "captions.jsonl"
    with StubServer(max_requests=20, lifetime=120) as server:
        assert _caption(videos, out, "--attribute-model", "sharegpt4v", "--attribute-endpoint", server.url,
                        "--action-model", "video-llava", "--action-endpoint", server.url,
                        "--merge-model", "gpt-3.5", "--merge-endpoint", server.url,
                        "--tokenizer", tokenizer_dir) == 0
    rows = _rows(out)
    assert len(server.requests) == 9  # 3 videos x (attribute, action, merge)
    assert [r["model"] for r in server.requests] == ["sharegpt4v"] * 3 + ["video-llava"] * 3 + ["gpt-3.5"] * 3
    for row in rows:
        assert row["attribute"] == "sharegpt4v saw 1 images for Describe the person"
        assert row["action"] == "video-llava saw 8 images for Describe in one"
        assert row["caption"].startswith("merged by gpt-3.5:") and row["tokens"] <= LIMIT
    merge_prompt = server.requests[6]["messages"][0]["content"]
    assert rows[0]["attribute"] in merge_prompt and rows[0]["action"] in merge_prompt


# ----------------------------------------------------------------------------- length on the template path

LONG_ATTRIBUTE = ("A young woman with long wavy auburn hair parted in the middle, fair skin with light freckles, "
                  "bright green eyes under thin arched eyebrows, a small straight nose and full lips with pink "
                  "lipstick, wearing small gold hoop earrings, a thin gold necklace with a round pendant, a cream "
                  "knitted turtleneck sweater under a brown suede jacket with a wide collar and silver buttons")
ACTION = "She turns her head to the left, smiles widely and then nods twice while speaking to the camera"


def test_captions_template_states_which_part_was_cut(tokenizer_dir, tmp_path, capsys) -> None:
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"id": "fits", "attribute": "a man with a beard", "action": "he talks"},
            {"id": "long_attribute", "attribute": LONG_ATTRIBUTE, "action": ACTION},
            {"id": "only_attribute_fits", "attribute": LONG_ATTRIBUTE + ", " + LONG_ATTRIBUTE, "action": ACTION},
            {"id": "given", "caption": LONG_ATTRIBUTE + " " + ACTION}]
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "captions.jsonl"
    assert cli.main(["captions", "--manifest", str(manifest), "--out", str(out),
                     "--tokenizer", str(tokenizer_dir)]) == 0
    result = {row["id"]: row for row in _rows(out)}
    assert not result["fits"]["truncated"] and result["fits"]["cut"] is None
    action_words = len(ACTION.split())
    long = result["long_attribute"]
    assert long["truncated"] and long["tokens"] > LIMIT
    assert list(long["cut"]) == ["action"] and 0 < long["cut"]["action"] <= action_words
    assert ACTION.endswith(long["lost"])
    both = result["only_attribute_fits"]
    assert both["cut"]["action"] == action_words and both["cut"]["attribute"] > 0  # the action is lost whole
    assert result["given"]["truncated"] and result["given"]["cut"] is None  # a given caption has no parts
    kept = long["caption"][: len(long["caption"]) - len(long["lost"])].strip()
    assert measure(kept, caption.caption_length.open_tokenizer(tokenizer_dir)).tokens <= LIMIT
    printed = capsys.readouterr().out
    assert "3 of 4 captions are cut at CLIP's 77 tokens" in printed
    assert "long_attribute: " in printed and "lost from the action (" in printed
    listed = (tmp_path / "captions.truncated.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in listed] == ["long_attribute", "only_attribute_fits", "given"]
    print("\n".join(f"{row['id']}: {row['tokens']} tokens, cut {row['cut']}" for row in result.values()))


def test_caption_template_merge_of_a_verbose_captioner_states_the_cut(videos, tokenizer_dir, tmp_path, capsys) -> None:
    out = tmp_path / "captions.jsonl"
    with StubServer(max_requests=10, lifetime=120) as server:
        assert _caption(videos, out, "--attribute-model", "verbose-sharegpt4v", "--attribute-endpoint", server.url,
                        "--action-model", "video-llava", "--action-endpoint", server.url,
                        "--tokenizer", tokenizer_dir) == 0
    rows = _rows(out)
    assert all(row["truncated"] and row["tokens"] > LIMIT for row in rows)
    assert all(row["cut"]["action"] == len(row["action"].split()) for row in rows)  # the action is lost whole
    assert all("attribute" in row["cut"] for row in rows)  # and the end of the 100-word attribute
    printed = capsys.readouterr().out
    assert f"3 of 3 captions are cut at CLIP's {LIMIT} tokens" in printed and "lost from the attribute (" in printed
    print(f"verbose attribute, template merge: {len(rows)} of {len(rows)} cut, e.g. {rows[0]['tokens']} tokens, "
          f"cut {rows[0]['cut']}")
