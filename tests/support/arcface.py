"""A random-weight face recognition ONNX in insightface's ArcFace layout (no real weights exist
offline): one input (N or 1, 3, 112, 112), one output (N, 512), so insightface's model router
loads it as `ArcFaceONNX`, as it does buffalo_l's w600k_r50.onnx. Two 4x4/4 convolutions and a
Gemm keep it small (1.7 MB) while every output depends on the whole crop.

`mxnet=True` adds the Sub and Mul nodes MXNet exports start with (insightface then feeds raw
0..255 pixels), the other preprocessing branch of `ArcFaceONNX`.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

EMBEDDING = 512


def arcface_model(seed: int = 0, batch: int | str = "None", mxnet: bool = False):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.RandomState(seed)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array((rng.randn(*shape) / np.sqrt(fan_in)).astype(np.float32), name)

    nodes, initialisers, first = [], [weight("conv1.w", 16, 3, 4, 4), weight("conv2.w", 16, 16, 4, 4),
                                      weight("fc.w", EMBEDDING, 16 * 7 * 7)], "input.1"
    initialisers.append(numpy_helper.from_array(rng.randn(EMBEDDING).astype(np.float32) * 0.1, "fc.b"))
    if mxnet:
        initialisers += [numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
                         numpy_helper.from_array(np.array(0.0078125, np.float32), "scale")]
        nodes += [helper.make_node("Sub", ["input.1", "mean"], ["centred"], name="_minus0"),
                  helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0")]
        first = "scaled"
    nodes += [
        helper.make_node("Conv", [first, "conv1.w"], ["c1"], name="Conv_0", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Relu", ["c1"], ["r1"], name="Relu_1"),  # (N,16,28,28)
        helper.make_node("Conv", ["r1", "conv2.w"], ["c2"], name="Conv_2", kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["c2"], ["flat"], name="Flatten_3", axis=1),  # (N,784)
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["683"], name="Gemm_4", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "arcface_random",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [batch, 3, 112, 112])],
        [helper.make_tensor_value_info("683", TensorProto.FLOAT, [batch, EMBEDDING])],
        initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="id_animator-tests")
    model.ir_version = 8  # readable by every onnxruntime the tests meet
    onnx.checker.check_model(model)
    return model


def write_arcface(path: Path, **options) -> Path:
    """Write the model to `path` unless the same bytes are already there (atomic: shared caches)."""
    data = arcface_model(**options).SerializeToString()
    if path.is_file() and not path.is_symlink() and path.read_bytes() == data:
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path
