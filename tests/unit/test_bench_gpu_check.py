"""bench/gpu_check.py, the GPU check of issue 20 (no GPU here): it imports, refuses to run its
full-size check without CUDA with a message saying what to do, and its code path (sampling plain
and with the adapter, training steps with and without gradient checkpointing) runs end to end on
the tiny model on CPU."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCH))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(BENCH))
    return gpu_check


def test_the_full_size_check_needs_cuda_and_says_so(gpu_check, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    for argv, message in [([], "no CUDA device here"), (["--device", "cpu"], "needs a CUDA device"),
                          (["--model", "tiny", "--device", "cpu", "--steps", "0"], "--steps must be >= 1")]:
        with pytest.raises(SystemExit):
            gpu_check.parse_args(argv)
        assert message in capsys.readouterr().err


def test_the_code_path_runs_on_the_tiny_model(gpu_check, tmp_path: Path):
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--model", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    for name in ("plain", "adapter"):
        assert report["sampling_fp16"][name]["s_per_step"] > 0
    for name in ("plain", "checkpointing"):
        assert report["training_bf16"][name]["s_per_step"] > 0 and report["training_bf16"][name]["counted_gb"] is None
    assert report["shape"] == gpu_check.TINY
