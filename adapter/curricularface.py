"""CurricularFace IR-101: the face recognition model of OpenS2V-Eval's FaceSim (pure PyTorch).

OpenS2V-Eval scores identity with `glint360k_curricular_face_r101_backbone.bin`, TFace's "IR_101"
backbone (Huang et al., CurricularFace, CVPR 2020): an improved-residual ResNet of 49 units in four
stages of widths 64/128/256/512 (3, 13, 30, 3 units) over a 112x112 RGB crop, then BN, a linear
layer to 512 and a non-affine BN1d. The module names below follow the checkpoint's keys
(`input_layer.*`, `body.<i>.res_layer.*`, `body.<i>.shortcut_layer.*`, `output_layer.*`), so the
released state dict loads as it is; the unit counts are read from the keys, so IR-18/34/50 files
load too. The model may also be given as an ONNX export (one (N, 3, 112, 112) input, one 512 output).

Input, as OpenS2V-Eval's `inference` feeds it: a 224x224 RGB `norm_crop`, resized to 112x112 by
cv2 (bilinear), pixels / 255, then (x - 0.5) / 0.5, NCHW float32.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import read_state_dict
from .errors import CheckpointError

logger = logging.getLogger(__name__)

INPUT_SIZE = 112
EMBEDDING = 512
WIDTHS = (64, 128, 256, 512)  # the four stages' channels (TFace IR, up to 100 layers)
IR101_UNITS = (3, 13, 30, 3)


class Unit(nn.Module):
    """An improved residual unit: BN, 3x3 conv, BN, PReLU, 3x3 conv (with the stride), BN, plus a
    shortcut (a 1x1 conv + BN when the width changes, else the input subsampled by the stride)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout),
            nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut_layer = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                               if cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a 1x1 max-pool with a stride (the released code's identity shortcut) is a subsampling
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.shortcut_layer is None else self.shortcut_layer(x)
        return self.res_layer(x) + shortcut


class IRNet(nn.Module):
    """TFace's IR backbone at 112x112: (N, 3, 112, 112) normalised RGB -> (N, 512) raw embeddings."""

    def __init__(self, units: Sequence[int] = IR101_UNITS) -> None:
        super().__init__()
        self.units = tuple(units)
        self.input_layer = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(WIDTHS[0]),
                                         nn.PReLU(WIDTHS[0]))
        blocks, cin = [], WIDTHS[0]
        for width, count in zip(WIDTHS, self.units):
            for index in range(count):  # each stage halves the resolution in its first unit
                blocks.append(Unit(cin, width, 2 if index == 0 else 1))
                cin = width
        self.body = nn.Sequential(*blocks)
        side = INPUT_SIZE // 2 ** len(WIDTHS)  # 7
        self.output_layer = nn.Sequential(nn.BatchNorm2d(WIDTHS[-1]), nn.Dropout(0.4), nn.Flatten(),
                                          nn.Linear(WIDTHS[-1] * side * side, EMBEDDING),
                                          nn.BatchNorm1d(EMBEDDING, affine=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_layer(self.body(self.input_layer(x)))


def units_of(state: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    """Units per stage, read from `body.<i>.res_layer.1.weight` widths (4 stages of WIDTHS)."""
    widths: dict[int, int] = {}
    for key, value in state.items():
        found = re.fullmatch(r"body\.(\d+)\.res_layer\.1\.weight", key)
        if found:
            widths[int(found.group(1))] = int(value.shape[0])
    if not widths or sorted(widths) != list(range(len(widths))):
        raise CheckpointError("no IR backbone units (body.<i>.res_layer.*) found")
    per_stage = [sum(1 for w in widths.values() if w == width) for width in WIDTHS]
    if sum(per_stage) != len(widths) or 0 in per_stage:
        raise CheckpointError(f"unit widths {sorted(set(widths.values()))} are not the IR stages {WIDTHS}")
    return tuple(per_stage)


def load_irnet(path: str | Path, device: str | torch.device = "cpu") -> IRNet:
    """A CurricularFace/ArcFace IR backbone from a state dict (.bin/.pth/.pt or .safetensors), read
    safely; every key and shape checked."""
    path = Path(path)
    state = read_state_dict(path)
    state = {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}
    try:
        units = units_of(state)
    except CheckpointError as error:
        raise CheckpointError(f"{path} is not a CurricularFace IR backbone ({error}); give "
                              f"glint360k_curricular_face_r101_backbone.bin (OpenS2V-Weight) or its ONNX export.") from None
    model = IRNet(units)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k].shape)})" for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{path}: not a 112x112 IR backbone with {sum(units)} units: "
                              f"{len(missing)} keys missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                              f"(e.g. {unexpected[:3]}), {len(wrong)} of another shape (e.g. {wrong[:2]}).")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    name = "IR-101" if units == IR101_UNITS else f"IR with units {units}"
    logger.info("CurricularFace %s from %s", name, path.name)
    return model.to(device).eval()


def curricularface_input(crops_224: np.ndarray) -> torch.Tensor:
    """(N, 224, 224, 3) uint8 RGB crops -> (N, 3, 112, 112) float32, as OpenS2V-Eval's `inference`."""
    import cv2

    small = np.stack([cv2.resize(np.ascontiguousarray(crop), (INPUT_SIZE, INPUT_SIZE)) for crop in crops_224])
    x = torch.from_numpy(small.transpose(0, 3, 1, 2).copy()).float()
    return x.div_(255).sub_(0.5).div_(0.5)


class CurricularFace:
    """The FaceSim model: a torch IR backbone or an ONNX export; embed() gives raw embeddings."""

    def __init__(self, path: str | Path, device: str = "cpu", providers: Sequence[str] = ("CPUExecutionProvider",)):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"No CurricularFace model at {self.path}: give the IR-101 backbone "
                                  f"(glint360k_curricular_face_r101_backbone.bin from OpenS2V-Weight) or an ONNX export.")
        self.device = device
        if self.path.suffix.lower() == ".onnx":
            import onnxruntime

            self.session = onnxruntime.InferenceSession(str(self.path), providers=list(providers))
            shape = self.session.get_inputs()[0].shape
            if len(shape) != 4 or shape[1:] != [3, INPUT_SIZE, INPUT_SIZE]:
                raise CheckpointError(f"{self.path}: an ONNX model with input {shape}; a CurricularFace export takes "
                                      f"(N, 3, {INPUT_SIZE}, {INPUT_SIZE}).")
            self.model = None
        else:
            self.session, self.model = None, load_irnet(self.path, device)

    def embed(self, crops_224: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 RGB norm_crops -> (N, 512) float32 raw embeddings."""
        x = curricularface_input(crops_224)
        if self.session is not None:
            inputs = self.session.get_inputs()[0]
            return np.concatenate([self.session.run(None, {inputs.name: x[i:i + 1].numpy()})[0]
                                   for i in range(len(x))]).astype(np.float32)
        with torch.no_grad():
            return self.model(x.to(self.device)).float().cpu().numpy()
