"""UniAnimate UNet file: the schema derived from the config, the strict check and its messages,
the official `state_dict` wrapper, and the safe reader (code pickles refused, never run)."""
from __future__ import annotations

import pickle

import pytest
import torch
from safetensors.torch import save_file

from id_animator.unianimate.checkpoint import check_state_dict, config_of, expected_shapes, load_unianimate_checkpoint
from id_animator.unianimate.config import OFFICIAL, UniAnimateConfig
from id_animator.unianimate.errors import CheckpointError
from id_animator.unianimate.unet import UniAnimateUNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = UniAnimateConfig(dim=32, head_dim=16, num_heads=2)


@pytest.fixture(scope="module")
def small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return UniAnimateUNet(SMALL).state_dict()


def test_schema_is_the_official_size_and_follows_the_config():
    full = expected_shapes()
    assert len(full) == 1544
    assert sum(torch.Size(s).numel() for s in full.values()) == 1_416_564_300
    assert full["input_blocks.0.0.weight"] == (320, 12, 3, 3)  # latent 4 + condition channels 8
    assert full["input_blocks.0.1.proj_in.weight"] == (512, 320, 1)  # 8 heads of 64
    assert full["pre_image_condition.2.weight"] == (4096, 1024)  # 4 image tokens
    small = expected_shapes(SMALL)
    assert set(small) == set(full) and small["input_blocks.0.0.weight"] == (32, 12, 3, 3)


@pytest.mark.parametrize("sizes", [{}, {"dim": 64, "num_res_blocks": 1, "num_heads": 2},
                                   {"dim": 96, "num_res_blocks": 3, "num_heads": 1}])
def test_a_file_gives_its_own_sizes(sizes):
    config = UniAnimateConfig(**sizes)
    tensors = {k: torch.empty(s, device="meta") for k, s in expected_shapes(config).items()}
    assert config_of(tensors) == config
    for container in (tensors, {"state_dict": tensors}):  # checked at the file's own size
        assert check_state_dict(container).keys() == tensors.keys()
    tensors.pop("input_blocks.0.1.proj_in.weight")
    assert config_of(tensors) == OFFICIAL  # no sizes to read: the strict check names what is wrong
    with pytest.raises(CheckpointError, match="missing"):
        check_state_dict(tensors)


@pytest.mark.parametrize("container", ["pth_wrapped", "pth_bare", "safetensors"])
def test_official_containers_load_strictly(tmp_path, small_state, container):
    path = tmp_path / ("unet.safetensors" if container == "safetensors" else "unet.pth")
    if container == "safetensors":
        save_file(small_state, str(path))
    else:
        torch.save({"state_dict": small_state, "step": 223000} if container == "pth_wrapped" else small_state, path)
    tensors = load_unianimate_checkpoint(path, SMALL)
    unet = UniAnimateUNet(SMALL, device="meta")
    unet.load_state_dict(tensors, strict=True, assign=True)
    loaded = unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in small_state.items())


def test_truncated_file_names_the_missing_keys(small_state):
    partial = dict(list(small_state.items())[:-40])
    with pytest.raises(CheckpointError, match=r"incomplete UniAnimate UNet .*40 of 1544 UNet tensors missing"):
        check_state_dict(partial, "unet.pth", SMALL)


def test_wrong_shapes_and_extra_keys_are_named(small_state):
    changed = dict(small_state)
    changed["out.2.weight"] = torch.zeros(8, 32, 3, 3)
    changed["pose_encoder.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as err:
        check_state_dict(changed, "other.pth", SMALL)
    message = str(err.value)
    assert "out.2.weight is [8, 32, 3, 3], expected [4, 32, 3, 3]" in message
    assert "1 unexpected keys (pose_encoder.weight)" in message
    assert "different layout" in message and "models/unianimate/" in message


def test_a_stable_diffusion_checkpoint_is_named_as_such():
    sd21 = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(320, 1024),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)}
    with pytest.raises(CheckpointError, match=r"an SD2\.x model checkpoint .*models/checkpoints/.*1544 of 1544 UNet tensors missing"):
        check_state_dict({"state_dict": sd21}, "v2-1_512-ema-pruned.ckpt")


def test_an_image_unet_without_temporal_layers_is_named():
    unet = {"input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3), "input_blocks.1.0.in_layers.0.weight": torch.zeros(320)}
    with pytest.raises(CheckpointError, match="without UniAnimate's temporal and pose layers"):
        check_state_dict(unet, "sd21_unet.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_a_code_pickle_is_refused_unrun(tmp_path, capsys):
    path = tmp_path / "unianimate_16f_32f_non_ema_223000.pth"
    path.write_bytes(pickle.dumps({"state_dict": {"x": _Payload()}}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_unianimate_checkpoint(path)
    assert "this must never run" not in capsys.readouterr().out
