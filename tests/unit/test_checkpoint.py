"""animator.ckpt: safe reading, key/shape validation, wrong-file messages, the converter (official §3)."""
from __future__ import annotations

import functools
import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from id_animator.adapter.checkpoint import (
    ADAPTER_SHAPES,
    EXPECTED_SHAPES,
    RESAMPLER_SHAPES,
    AdapterWeights,
    load_adapter_checkpoint,
    official_state_dict,
    parse_adapter_state,
    random_adapter_weights,
    read_state_dict,
    save_adapter_safetensors,
)
from id_animator.adapter.errors import CheckpointError
from support.layouts import LAYOUTS, container

REPO = Path(__file__).resolve().parents[2]
RESAMPLER_PARAMS, ADAPTER_PARAMS = 29_918_208, 31_899_648  # official §3.2, §3.3
EXPECTED_HINT = ("animator.ckpt", "models/id_animator/")


@functools.cache
def shared_weights(dtype: torch.dtype = torch.float16) -> AdapterWeights:
    """One random adapter per dtype for the whole module (generating 62 M values takes a second)."""
    return random_adapter_weights(seed=0, dtype=dtype)


def assert_identical(expected: AdapterWeights, actual: AdapterWeights) -> None:
    assert list(actual.resampler) == list(expected.resampler)
    assert list(actual.layers) == list(expected.layers)
    for key, tensor in expected.resampler.items():
        assert actual.resampler[key].dtype == tensor.dtype and torch.equal(actual.resampler[key], tensor), key
    for index, layer in expected.layers.items():
        assert list(actual.layers[index]) == list(layer)
        for key, tensor in layer.items():
            got = actual.layers[index][key]
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), (index, key)


def parse_error(state: Any) -> str:
    with pytest.raises(CheckpointError) as info:
        parse_adapter_state(state, source="test.ckpt")
    message = str(info.value)
    assert "test.ckpt" in message and all(hint in message for hint in EXPECTED_HINT), message
    return message


def read_error(path: Path) -> str:
    with pytest.raises(CheckpointError) as info:
        load_adapter_checkpoint(path)
    message = str(info.value)
    assert str(path) in message, message
    return message


# ---------------------------------------------------------------------------------------------
# The shape table


def test_shape_table_matches_official_counts():
    assert len(RESAMPLER_SHAPES) == 51
    assert sum(math.prod(s) for s in RESAMPLER_SHAPES.values()) == RESAMPLER_PARAMS
    assert sorted(ADAPTER_SHAPES) == list(range(1, 32, 2))
    assert sum(len(layer) for layer in ADAPTER_SHAPES.values()) == 160
    assert sum(math.prod(s) for layer in ADAPTER_SHAPES.values() for s in layer.values()) == ADAPTER_PARAMS
    assert len(EXPECTED_SHAPES) == 211


def test_adapter_widths_follow_the_official_block_map():
    widths = {index: layer["to_k_face.weight"][0] for index, layer in ADAPTER_SHAPES.items()}
    by_width = {w: sorted(i for i, x in widths.items() if x == w) for w in set(widths.values())}
    assert by_width == {320: [1, 3, 25, 27, 29], 640: [5, 7, 19, 21, 23], 1280: [9, 11, 13, 15, 17, 31]}
    for index, layer in ADAPTER_SHAPES.items():
        assert layer["to_q_lora.down.weight"] == (128, widths[index])
        assert layer["to_k_lora.down.weight"] == (128, 768)


def test_resampler_table_loads_into_the_packs_resampler():
    from id_animator.adapter.resampler import Resampler

    module_shapes = {k: tuple(v.shape) for k, v in Resampler().state_dict().items()}
    assert module_shapes == RESAMPLER_SHAPES
    Resampler().load_state_dict(shared_weights(torch.float32).resampler, strict=True)


def test_random_weights_are_seeded_and_typed():
    reference = shared_weights(torch.float32)  # seed 0
    a = random_adapter_weights(seed=0, dtype=torch.bfloat16)
    assert a.tensor_count == 211 and a.parameter_count == RESAMPLER_PARAMS + ADAPTER_PARAMS
    assert {t.dtype for t in a.tensors()} == {torch.bfloat16}
    assert all(torch.equal(x, y.to(torch.bfloat16)) for x, y in zip(a.tensors(), reference.tensors(), strict=True))
    other = random_adapter_weights(seed=1)
    assert not torch.equal(other.resampler["latents"], reference.resampler["latents"])
    assert 0.015 < reference.layers[1]["to_k_face.weight"].std() < 0.025
    assert abs(reference.resampler["norm_out.weight"].mean() - 1) < 0.01
    assert abs(reference.resampler["layers.2.1.0.weight"].mean() - 1) < 0.01  # FF LayerNorm gain


def test_to_casts_every_tensor():
    half = shared_weights(torch.float32).to(torch.float16)
    assert {t.dtype for t in half.tensors()} == {torch.float16}
    assert half.tensor_count == 211


# ---------------------------------------------------------------------------------------------
# Round trips through every container layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_every_layout(tmp_path, layout):
    weights = shared_weights()
    ckpt = tmp_path / "animator.ckpt"
    torch.save(container(weights, layout), ckpt)
    loaded = load_adapter_checkpoint(ckpt)
    assert_identical(weights, loaded)
    assert len(loaded.resampler) == 51 and sum(len(layer) for layer in loaded.layers.values()) == 160
    assert sum(t.numel() for t in loaded.resampler.values()) == RESAMPLER_PARAMS
    assert sum(t.numel() for layer in loaded.layers.values() for t in layer.values()) == ADAPTER_PARAMS

    converted = tmp_path / "animator.safetensors"
    save_adapter_safetensors(loaded, converted)
    assert_identical(weights, load_adapter_checkpoint(converted))
    with safe_open(str(converted), "pt") as f:
        assert f.metadata()["format"] == "id-animator"
        assert len(list(f.keys())) == 211
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_round_trip_fp32_legacy_torch_file(tmp_path):
    weights = shared_weights(torch.float32)
    ckpt = tmp_path / "animator.ckpt"
    torch.save(container(weights, "state_dict_module"), ckpt, _use_new_zipfile_serialization=False)
    assert ckpt.read_bytes()[:2] == b"\x80\x02"  # really the legacy (non-zip) format
    loaded = load_adapter_checkpoint(ckpt)
    assert_identical(weights, loaded)
    save_adapter_safetensors(loaded, tmp_path / "a.safetensors")
    assert_identical(weights, load_adapter_checkpoint(tmp_path / "a.safetensors"))


def test_container_extras_outside_the_state_dict_are_ignored_like_the_official_loader():
    weights = shared_weights()
    state = official_state_dict(weights, "state_dict") | {"epoch": 7, "global_step": 1000}
    assert_identical(weights, parse_adapter_state(state))


# ---------------------------------------------------------------------------------------------
# Wrong content: each kind of file is named


def _zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape, dtype=torch.float16)


def _ip_adapter_layers(width_of: dict[int, int], context: int, faceid: bool) -> dict[str, torch.Tensor]:
    layers: dict[str, torch.Tensor] = {}
    for index, width in width_of.items():
        layers[f"{index}.to_k_ip.weight"] = _zeros(width, context)
        layers[f"{index}.to_v_ip.weight"] = _zeros(width, context)
        if faceid:  # FaceID puts rank-128 LoRAs on attn1 (even) and attn2 (odd) layers
            for i in (index - 1, index):
                layers[f"{i}.to_q_lora.down.weight"] = _zeros(128, width)
                layers[f"{i}.to_q_lora.up.weight"] = _zeros(width, 128)
    return layers


SD15_WIDTHS = {1: 320, 3: 320, 5: 640, 31: 1280}


def test_ip_adapter_plus_sd15_is_named():
    state = {"image_proj": dict(shared_weights().resampler),
             "ip_adapter": _ip_adapter_layers(SD15_WIDTHS, 768, faceid=False)}
    message = parse_error(state)
    assert "IP-Adapter Plus file for SD1.5" in message and "models/ipadapter/" in message
    assert "missing 160 of 211 tensors (all 160 face_adapter tensors)" in message


def test_ip_adapter_faceid_is_named():
    image_proj = {"proj.0.weight": _zeros(1024, 512), "proj.0.bias": _zeros(1024),
                  "proj.2.weight": _zeros(3072, 1024), "proj.2.bias": _zeros(3072),
                  "norm.weight": _zeros(768), "norm.bias": _zeros(768)}
    state = {"image_proj": image_proj, "ip_adapter": _ip_adapter_layers(SD15_WIDTHS, 768, faceid=True)}
    message = parse_error(state)
    assert "IP-Adapter FaceID" in message and "SD1.5" in message


def test_ip_adapter_plus_sdxl_flat_safetensors_is_named():
    state = {"image_proj.latents": _zeros(1, 16, 1280), "image_proj.proj_out.weight": _zeros(2048, 1280),
             **{f"ip_adapter.{k}": v for k, v in _ip_adapter_layers({1: 640, 139: 1280}, 2048, False).items()}}
    message = parse_error(state)
    assert "IP-Adapter Plus file for SDXL" in message


def test_sdxl_face_adapter_is_named():
    widths = {1: 640, 69: 1280, 139: 1280}  # SDXL: 70 odd indices, 2048-wide text context
    adapter = {f"adapter_modules.{i}.to_k_face.weight": _zeros(w, 2048) for i, w in widths.items()}
    message = parse_error({"state_dict": adapter})
    assert "SDXL" in message and "SD1.5" in message


def test_sdxl_resampler_output_is_named():
    state = official_state_dict(shared_weights(), "flat")
    state["image_proj.proj_out.weight"] = _zeros(2048, 768)
    message = parse_error(state)
    assert "SDXL" in message and "image_proj.proj_out.weight: (2048, 768), expected (768, 768)" in message


def test_motion_module_is_named_and_lists_are_capped():
    state = {f"{block}.motion_modules.{m}.temporal_transformer.{p}": _zeros(4)
             for block in ("down_blocks.0", "down_blocks.1", "up_blocks.3") for m in range(3)
             for p in ("norm.weight", "norm.bias", "proj_in.weight", "proj_out.weight")}
    message = parse_error(state)
    assert "AnimateDiff motion module" in message and "models/animatediff_models/" in message
    assert f"{len(state)} unexpected keys" in message and f"and {len(state) - 6} more" in message
    assert "none of the 211 adapter tensors" in message and len(message) < 2500


def test_sd_checkpoint_is_named():
    state = {"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": _zeros(320, 4, 3, 3),
                            "first_stage_model.decoder.conv_in.weight": _zeros(4),
                            "cond_stage_model.transformer.text_model.final_layer_norm.weight": _zeros(768)}}
    message = parse_error(state)
    assert "SD1.5 model checkpoint" in message and "models/checkpoints/" in message


@pytest.mark.parametrize("width, name", [(1024, "ViT-L/14"), (1280, "ViT-H/14")])
def test_clip_vision_model_is_named(width, name):
    state = {"vision_model.embeddings.class_embedding": _zeros(width),
             "vision_model.post_layernorm.weight": _zeros(width)}
    message = parse_error(state)
    assert f"CLIP {name} vision model" in message and "models/clip_vision/" in message


@pytest.mark.parametrize("layout", ["state_dict", "image_proj+face_adapter", "flat"])
def test_partial_state_is_called_truncated(layout):
    state = container(shared_weights(), layout)
    inner = state.get("state_dict", state.get("face_adapter", state))
    for key in list(inner)[-40:]:
        del inner[key]
    message = parse_error(state)
    assert "truncated or partial" in message and "missing 40 of 211" in message
    assert "face_adapter.31.* (10 tensors)" in message


def test_mis_shaped_wrong_dtype_non_tensor_and_nan_are_each_listed():
    state = official_state_dict(shared_weights(), "state_dict")["state_dict"]
    state["image_proj_model.latents"] = _zeros(1, 16, 1024)
    state["adapter_modules.5.to_k_face.weight"] = state["adapter_modules.5.to_k_face.weight"].to(torch.int32)
    state["adapter_modules.7.to_v_face.weight"] = [1.0, 2.0]
    nan = state["adapter_modules.31.to_out_lora.up.weight"].clone()
    nan[3, 4] = float("nan")
    state["adapter_modules.31.to_out_lora.up.weight"] = nan
    message = parse_error(state)
    assert "image_proj_model.latents: (1, 16, 1024), expected (1, 16, 768)" in message
    assert "adapter_modules.5.to_k_face.weight has dtype int32, not floating point" in message
    assert "adapter_modules.7.to_v_face.weight is a list, not a tensor" in message
    assert "adapter_modules.31.to_out_lora.up.weight contains NaN" in message
    assert "truncated" not in message and "missing" not in message


def test_even_index_and_duplicate_keys_are_unexpected():
    state = official_state_dict(shared_weights(), "state_dict")["state_dict"]
    state["adapter_modules.2.to_k_face.weight"] = _zeros(320, 768)
    state["module.image_proj_model.latents"] = state["image_proj_model.latents"]
    message = parse_error(state)
    assert "2 unexpected keys" in message and "missing" not in message
    assert "adapter_modules.2.to_k_face.weight" in message
    assert "a second copy of image_proj.latents" in message


def test_not_a_dict_is_refused():
    assert "holds a list" in parse_error([torch.zeros(3)])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Wrong or damaged files


@pytest.fixture(scope="module")
def saved_files(tmp_path_factory) -> dict[str, Path]:
    """A good zip checkpoint, a legacy one and a safetensors file, written once."""
    folder = tmp_path_factory.mktemp("ckpt")
    weights = shared_weights()
    files = {"zip": folder / "animator.ckpt", "legacy": folder / "legacy.ckpt",
             "safetensors": folder / "animator.safetensors"}
    torch.save(official_state_dict(weights, "state_dict"), files["zip"])
    torch.save(official_state_dict(weights, "state_dict"), files["legacy"], _use_new_zipfile_serialization=False)
    save_adapter_safetensors(weights, files["safetensors"])
    return files


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors"])
@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_files_say_re_download(tmp_path, saved_files, kind, keep):
    data = saved_files[kind].read_bytes()
    cut = tmp_path / saved_files[kind].name
    cut.write_bytes(data[: int(len(data) * keep)])
    message = read_error(cut)
    assert "truncated" in message and "re-download" in message


def test_safetensors_cut_inside_its_header(tmp_path, saved_files):
    cut = tmp_path / "animator.safetensors"
    cut.write_bytes(saved_files["safetensors"].read_bytes()[:200])
    assert "truncated" in read_error(cut)


def test_empty_file(tmp_path):
    empty = tmp_path / "animator.ckpt"
    empty.write_bytes(b"")
    assert "empty" in read_error(empty)


@pytest.mark.parametrize("name", ["animator.ckpt", "animator.safetensors"])
def test_random_bytes(tmp_path, name):
    junk = tmp_path / name
    junk.write_bytes(b"\x13\x37" + random.Random(0).randbytes(4096))
    assert "neither a safetensors file nor a PyTorch checkpoint" in read_error(junk)


@pytest.mark.parametrize("content, words", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "Git LFS pointer"),
    (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
])
def test_download_placeholders_are_named(tmp_path, content, words):
    fake = tmp_path / "animator.ckpt"
    fake.write_bytes(content)
    assert words in read_error(fake)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    import zipfile

    archive = tmp_path / "animator.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("readme.txt", "hello")
    assert "not a PyTorch checkpoint" in read_error(archive)


def test_missing_file_is_an_os_error_and_a_checkpoint_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.ckpt does not exist") as info:
        load_adapter_checkpoint(tmp_path / "nope.ckpt")
    assert isinstance(info.value, CheckpointError)


@pytest.mark.parametrize("real, name", [("zip", "animator.safetensors"), ("legacy", "animator.safetensors"),
                                        ("safetensors", "animator.ckpt")])
def test_misnamed_files_are_read_by_their_real_format(tmp_path, saved_files, caplog, real, name):
    """Decision: sniff the real format and read it with that format's safe reader, with a warning."""
    renamed = tmp_path / name
    renamed.write_bytes(saved_files[real].read_bytes())
    with caplog.at_level("WARNING"):
        assert_identical(shared_weights(), load_adapter_checkpoint(renamed))
    assert f"named {renamed.suffix} but really" in caplog.text


class _WritesMarker:
    """Unpickling this object runs code: it would create the marker file."""

    def __init__(self, marker: Path, via: str):
        self.marker, self.via = marker, via

    def __reduce__(self):
        if self.via == "os.system":
            return (os.system, (f"touch '{self.marker}'",))
        return (exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",))


def _write_malicious(path: Path, container: str, payload: _WritesMarker) -> None:
    state = {"state_dict": {"image_proj_model.latents": torch.zeros(1, 16, 768)}, "extra": payload}
    if container == "zip":
        torch.save(state, path)
    elif container == "legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(state, protocol=int(container.removeprefix("pickle"))))


@pytest.mark.parametrize("container", ["zip", "legacy", "pickle2", "pickle4"])
@pytest.mark.parametrize("via", ["os.system", "exec"])
@pytest.mark.parametrize("name", ["animator.ckpt", "animator.safetensors"])
def test_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path, container, via, name):
    marker = tmp_path / "MARKER"
    evil = tmp_path / name
    _write_malicious(evil, container, _WritesMarker(marker, via))
    # prove the payload is live: an unrestricted unpickler runs it
    if container.startswith("pickle"):
        pickle.loads(evil.read_bytes())
    else:
        with evil.open("rb") as f:  # a file object: torch.load picks safetensors by a path's suffix
            torch.load(f, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(CheckpointError) as info:
        read_state_dict(evil)
    assert not marker.exists()
    message = str(info.value)
    assert str(evil) in message and "NOT loaded" in message and "code" in message
    if container in ("zip", "legacy"):
        assert "exec" in message or "system" in message  # names the object it asked for
    if name.endswith(".safetensors"):
        assert "named .safetensors but really" in message


# ---------------------------------------------------------------------------------------------
# The converter CLI


def _run_cli(import_root: Path, *args: str, module: str = "id_animator.adapter.convert", cwd: Path | None = None):
    env = dict(os.environ, PYTHONPATH=str(import_root), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd or import_root, timeout=300)


def test_cli_converts_and_verifies(tmp_path, saved_files, import_root):
    out = tmp_path / "animator.safetensors"
    result = _run_cli(import_root, saved_files["legacy"], out)
    assert result.returncode == 0, result.stderr
    assert "211 tensors" in result.stdout and "61,817,856 parameters" in result.stdout
    assert "verified identical" in result.stdout and len(result.stdout.strip().splitlines()) == 1
    assert_identical(shared_weights(), load_adapter_checkpoint(out))


def test_cli_runs_from_the_pack_folder_and_casts(tmp_path, saved_files, import_root):
    out = tmp_path / "animator_bf16.safetensors"
    result = _run_cli(import_root, saved_files["zip"], out, "--dtype", "bf16", module="adapter.convert", cwd=REPO)
    assert result.returncode == 0, result.stderr
    converted = load_adapter_checkpoint(out)
    assert {t.dtype for t in converted.tensors()} == {torch.bfloat16}
    assert_identical(shared_weights().to(torch.bfloat16), converted)


def test_cli_bad_file_exits_1_with_the_message(tmp_path, import_root):
    motion = tmp_path / "mm_sd_v15_v2.ckpt"
    torch.save({"down_blocks.0.motion_modules.0.temporal_transformer.norm.weight": torch.zeros(320)}, motion)
    out = tmp_path / "out.safetensors"
    result = _run_cli(import_root, motion, out)
    assert result.returncode == 1
    assert "AnimateDiff motion module" in result.stderr and "animator.ckpt" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_cli_refuses_an_output_that_is_not_safetensors(tmp_path, saved_files, import_root):
    result = _run_cli(import_root, saved_files["zip"], tmp_path / "out.ckpt")
    assert result.returncode == 2 and ".safetensors" in result.stderr


# ---------------------------------------------------------------------------------------------
# Property: any dict either parses or raises CheckpointError, never anything else

FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHER_DTYPES = [torch.int8, torch.int64, torch.bool, torch.complex64, torch.uint8]
NON_TENSORS = st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=5), st.lists(st.integers(), max_size=3),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.binary(max_size=4))
ODD_KEYS = st.one_of(
    st.sampled_from(["image_proj.extra", "adapter_modules.2.to_k_face.weight", "face_adapter.33.to_k_face.weight",
                     "module.image_proj_model.latents", "ip_adapter.1.to_k_ip.weight", "state_dict",
                     "down_blocks.0.motion_modules.0.x", "adapter_modules.x.to_k_face.weight", ""]),
    st.text(max_size=12), st.integers(), st.tuples(st.integers()))
Mutation = tuple[str, int, Any]
MUTATIONS = st.one_of(
    st.tuples(st.just("drop"), st.integers(0, 300), st.none()),
    st.tuples(st.just("add"), st.integers(0, 300),
              st.tuples(ODD_KEYS, st.one_of(NON_TENSORS, st.just(torch.zeros(2))))),
    st.tuples(st.just("reshape"), st.integers(0, 300), st.lists(st.integers(0, 5), max_size=4)),
    st.tuples(st.just("dtype"), st.integers(0, 300), st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES)),
    st.tuples(st.just("value"), st.integers(0, 300), NON_TENSORS),
    st.tuples(st.just("nan"), st.integers(0, 300), st.sampled_from([float("nan"), float("inf"), -float("inf")])),
)


def _tensor_dicts(state: dict[Any, Any], layout: str) -> list[dict[Any, Any]]:
    """The dict(s) of a layout that hold the tensors."""
    if layout.startswith("state_dict"):
        return [state["state_dict"]]
    return [state["image_proj"], state["face_adapter"]] if layout == "image_proj+face_adapter" else [state]


def _mutate(inner: dict[Any, Any], mutation: Mutation) -> None:
    """Apply one mutation in place (a later one may undo an earlier one: int8, then float16)."""
    kind, position, arg = mutation
    if kind == "add":
        key, value = arg
        inner.setdefault(key, value)  # never overwrite: an added key must be extra
        return
    if not inner:
        return
    key = sorted(inner, key=repr)[position % len(inner)]
    value = inner[key]
    if kind == "drop":
        del inner[key]
    elif kind == "value":
        inner[key] = arg
    elif not isinstance(value, torch.Tensor):
        return
    elif kind == "reshape":
        inner[key] = torch.zeros(arg)
    elif kind == "dtype":
        inner[key] = value.to(arg)
    elif value.is_floating_point() and value.numel():  # "nan": one NaN or inf somewhere
        flat = value.flatten().clone()
        flat[position % flat.numel()] = arg
        inner[key] = flat.view_as(value)


def _still_valid(original: dict[Any, Any], inner: dict[Any, Any]) -> bool:
    """Judged on the final dict: the same keys, each a finite float tensor of its original shape."""
    if set(inner) != set(original):
        return False
    return all(isinstance(value, torch.Tensor) and value.shape == original[key].shape
               and value.dtype in FLOAT_DTYPES and bool(torch.isfinite(value).all())
               for key, value in inner.items())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS), mutations=st.lists(MUTATIONS, max_size=3), which=st.integers(0, 1))
@example(layout="state_dict", mutations=[("dtype", 0, torch.int8), ("dtype", 0, torch.float16)], which=0)
@example(layout="flat", mutations=[("reshape", 3, [2]), ("dtype", 3, torch.float32)], which=0)
def test_property_mutated_checkpoints_parse_or_raise_checkpoint_error(layout, mutations, which):
    state = container(shared_weights(), layout)
    dicts = _tensor_dicts(state, layout)
    mutated = dicts[which % len(dicts)]
    original = dict(mutated)
    for mutation in mutations:
        _mutate(mutated, mutation)
    valid = _still_valid(original, mutated)
    try:
        result = parse_adapter_state(state)
    except CheckpointError as error:
        assert not valid, f"a valid checkpoint was refused: {error}"
        assert "animator.ckpt" in str(error)
    else:
        assert valid, f"an invalid checkpoint was accepted after {mutations}"
        assert isinstance(result, AdapterWeights) and result.tensor_count == 211


TENSORS = st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                    st.lists(st.integers(0, 4), max_size=3), st.sampled_from(FLOAT_DTYPES + OTHER_DTYPES))
EXPECTED_KEYS = st.sampled_from(sorted(EXPECTED_SHAPES)).flatmap(
    lambda name: st.sampled_from([name, f"module.{name}", name.replace("image_proj.", "image_proj_model.")
                                  .replace("face_adapter.", "adapter_modules.")]))
RANDOM_STATES = st.recursive(
    st.dictionaries(st.one_of(EXPECTED_KEYS, ODD_KEYS), st.one_of(TENSORS, NON_TENSORS), max_size=8),
    lambda inner: st.dictionaries(st.sampled_from(["state_dict", "image_proj", "face_adapter", "ip_adapter", "x"]),
                                  inner, max_size=3),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(state=RANDOM_STATES)
def test_property_random_dicts_raise_only_checkpoint_error(state):
    with pytest.raises(CheckpointError):
        parse_adapter_state(state)
