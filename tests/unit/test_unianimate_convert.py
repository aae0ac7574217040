"""unianimate.convert: a pickled UNet file (the official container) becomes a checked .safetensors
with the same tensors; a wrong file is refused with the checker's message. Reduced size (the
converter reads it at its own size)."""
from __future__ import annotations

import pytest
import torch

from id_animator.unianimate import checkpoint, convert
from id_animator.unianimate.config import UniAnimateConfig
from id_animator.unianimate.unet import UniAnimateUNet

SMALL = UniAnimateConfig(dim=32, num_res_blocks=1, num_heads=1)


def test_pickle_to_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    state = UniAnimateUNet(SMALL).state_dict()
    source, target = tmp_path / "unianimate.pth", tmp_path / "unianimate.safetensors"
    torch.save({"state_dict": state}, source)
    assert convert.main([str(source), str(target), "--dtype", "fp16"]) == 0
    written = checkpoint.load_unianimate_checkpoint(target)  # read at the file's own size
    assert checkpoint.config_of(written) == SMALL
    assert set(written) == set(state)
    assert all(written[k].dtype == torch.float16 and torch.equal(written[k], v.half()) for k, v in state.items())


def test_wrong_file_is_refused(tmp_path, capsys):
    source = tmp_path / "not_unianimate.pth"
    torch.save({"weight": torch.zeros(3)}, source)
    assert convert.main([str(source), str(tmp_path / "out.safetensors")]) == 1
    assert "not the UniAnimate UNet" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_target_must_be_safetensors(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        convert.main([str(tmp_path / "a.pth"), str(tmp_path / "b.pth")])
    assert exit_.value.code == 2
