"""Random-weight stand-ins for the two DWPose ONNX files, with the official inputs and outputs.

- `yolox_l.onnx`: input `images` 1x3x640x640 (raw 0..255 BGR), output 1x8400x85 in the YOLOX
  export's convention (xy offsets in cells, log wh, sigmoid objectness and class scores). Each grid
  level average-pools the image to its stride and maps the colour of each cell through a random
  1x1 conv, so boxes and scores follow the image content: some cells score above the person
  threshold, many overlap (NMS has work), and a wrong letterbox moves them.
- `dw-ll_ucoco_384.onnx`: input `input` 1x3x384x288, outputs `simcc_x` 1x133x576 and `simcc_y`
  1x133x768. A random linear map of the crop's 4x3 pooled colours gives each keypoint a peak
  position on each axis and a peak height, so the argmaxes (and which points pass 0.3 or fall <= 0)
  depend on which pixels the affine crop took.
Generated at test time into the cache (never committed).
"""
from __future__ import annotations

import hashlib
import inspect
from pathlib import Path

import numpy as np

from support.models import cached_file

DETECTOR_SEED, POSE_SEED = 2106, 2107
OPSET = 17


def _graph_file(path: Path, nodes, inputs, outputs, initializers) -> None:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, path.stem, inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8  # readable by every onnxruntime the pack supports
    onnx.checker.check_model(model)
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())


def _const(name: str, value: np.ndarray):
    from onnx import numpy_helper
    return numpy_helper.from_array(np.asarray(value), name)


def write_detector(path: Path) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(DETECTOR_SEED)
    nodes, inits, levels = [], [], []
    inits.append(_const("inv255", np.array(1 / 255, dtype=np.float32)))
    nodes.append(helper.make_node("Mul", ["images", "inv255"], ["unit"]))
    for stride in (8, 16, 32):
        weight = rng.normal(0, 3.0, (85, 3, 1, 1)).astype(np.float32)
        bias = rng.normal(0, 0.5, 85).astype(np.float32)
        bias[4], bias[5] = -2.5, 0.5  # objectness and "person": some cells above 0.3, not hundreds
        bias[6:] -= 2.0
        inits += [_const(f"w{stride}", weight), _const(f"b{stride}", bias),
                  _const(f"shape{stride}", np.array([1, 85, (640 // stride) ** 2], dtype=np.int64))]
        nodes += [helper.make_node("AveragePool", ["unit"], [f"pool{stride}"], kernel_shape=[stride, stride],
                                   strides=[stride, stride]),
                  helper.make_node("Conv", [f"pool{stride}", f"w{stride}", f"b{stride}"], [f"head{stride}"]),
                  helper.make_node("Reshape", [f"head{stride}", f"shape{stride}"], [f"flat{stride}"])]
        levels.append(f"flat{stride}")
    scale, shift = np.ones(85, np.float32), np.zeros(85, np.float32)
    scale[2:4], shift[2:4] = 2.0, 1.0  # log wh in [1, 3]: boxes of 2.7..20 cells
    inits += [_const("scale", scale), _const("shift", shift)]
    nodes += [helper.make_node("Concat", levels, ["rows_t"], axis=2),
              helper.make_node("Transpose", ["rows_t"], ["rows"], perm=[0, 2, 1]),
              helper.make_node("Sigmoid", ["rows"], ["squashed"]),
              helper.make_node("Mul", ["squashed", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "shift"], ["output"])]
    _graph_file(path, nodes, [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 640, 640])],
                [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 8400, 85])], inits)


def write_pose_model(path: Path) -> None:
    from onnx import TensorProto, helper

    rng = np.random.default_rng(POSE_SEED)
    points, height, width = 133, 384, 288
    weight = rng.normal(0, 0.1, (36, points * 4)).astype(np.float32)
    bias = np.tile(np.array([0.0, 0.0, 0.5, 0.5], np.float32), points).reshape(points, 4)
    bias[:17, 2:] = 3.0  # the COCO body: seen, so that the alignment has its scale and bones (feet, hands vary)
    bias = bias.reshape(-1)
    inits = [_const("w", weight), _const("b", bias),
             _const("shape", np.array([1, points, 4], dtype=np.int64)),
             _const("split", np.array([1, 1, 1, 1], dtype=np.int64)),
             _const("grid_x", (np.arange(2 * width, dtype=np.float32) / (2 * width))[None, None]),
             _const("grid_y", (np.arange(2 * height, dtype=np.float32) / (2 * height))[None, None]),
             _const("sharp", np.array(40.0, dtype=np.float32))]
    nodes = [helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[96, 96], strides=[96, 96]),
             helper.make_node("Flatten", ["pooled"], ["features"]),
             helper.make_node("Gemm", ["features", "w", "b"], ["params_flat"]),
             helper.make_node("Reshape", ["params_flat", "shape"], ["params"]),
             helper.make_node("Split", ["params", "split"], ["cx_logit", "cy_logit", "peak_x", "peak_y"], axis=2)]
    for axis in ("x", "y"):
        nodes += [helper.make_node("Sigmoid", [f"c{axis}_logit"], [f"c{axis}"]),
                  helper.make_node("Sub", [f"grid_{axis}", f"c{axis}"], [f"d{axis}"]),
                  helper.make_node("Mul", [f"d{axis}", f"d{axis}"], [f"d{axis}2"]),
                  helper.make_node("Mul", [f"d{axis}2", "sharp"], [f"fall{axis}"]),
                  helper.make_node("Sub", [f"peak_{axis}", f"fall{axis}"], [f"simcc_{axis}"])]
    _graph_file(path, nodes, [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, height, width])],
                [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [1, points, 2 * width]),
                 helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [1, points, 2 * height])], inits)


def dwpose_files(cache: Path) -> dict[str, Path]:
    """{'yolox_l.onnx': path, 'dw-ll_ucoco_384.onnx': path} in the cache, keyed by this module's source."""
    key = hashlib.sha256(inspect.getsource(inspect.getmodule(dwpose_files)).encode()).hexdigest()[:16]
    folder = cache / "generated" / f"dwpose.{key}"
    return {"yolox_l.onnx": cached_file(folder / "yolox_l.onnx", write_detector),
            "dw-ll_ucoco_384.onnx": cached_file(folder / "dw-ll_ucoco_384.onnx", write_pose_model)}
