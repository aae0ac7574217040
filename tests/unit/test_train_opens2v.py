"""`score --protocol opens2v` against OpenS2V-Nexus's own eval/get_facesim.py, imported from a
checkout (only `decord` stubbed, by a PyAV reader), on the same random-weight models: the real
SCRFD detector, a random ArcFace-layout recogniser, and for CurricularFace a random IR-101 (their
`get_model("IR_101")`, loaded by our pure-torch IR-101) and a small random ONNX network that both
sides run (ours as ONNX, theirs as the same weights in torch) to keep 32-frame videos fast."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from id_animator.adapter.curricularface import CurricularFace, load_irnet
from id_animator.adapter.errors import CheckpointError
from id_animator.train import cli, opens2v
from support import opens2v as official
from support.arcface import arcface_model, write_arcface
from support.videos import face_video_frames, write_video

skimage_data = pytest.importorskip("skimage.data")
RTOL = 1e-5


@pytest.fixture(scope="module")
def theirs(cache_dir: Path):
    return official.import_facesim(official.checkout(cache_dir))


def _randomise_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Random BN statistics and affines, so that a wrong BN order or eps would show."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.data.copy_(torch.randn(n, generator=generator) * 0.1)
    return model.eval()


def test_ir101_equals_theirs(theirs, tmp_path: Path) -> None:
    facesim, get_model = theirs
    torch.manual_seed(0)
    model = _randomise_norms(get_model("IR_101")([112, 112]))
    path = tmp_path / "glint360k_curricular_face_r101_backbone.bin"
    torch.save(model.state_dict(), path)
    ours = CurricularFace(path)
    assert ours.model.units == (3, 13, 30, 3)
    crop = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    expected = facesim.inference(model, crop[0], "cpu")  # their preprocessing + model, unit length
    got = ours.embed(crop)[0]
    got = got / np.linalg.norm(got)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())
    print(f"IR-101 ours vs theirs: max |diff| {np.abs(got - expected).max():.2e} of max |x| "
          f"{np.abs(expected).max():.3f}, cosine {float(got @ expected):.8f}")
    state = model.state_dict()
    del state["body.20.res_layer.1.weight"]
    torch.save(state, tmp_path / "broken.bin")
    with pytest.raises(CheckpointError, match="not a CurricularFace IR backbone|keys missing"):
        load_irnet(tmp_path / "broken.bin")


class TorchMirror(torch.nn.Module):
    """support.arcface's ONNX graph (4x4/4 conv, ReLU, 4x4/4 conv, flatten, Gemm) in torch."""

    def __init__(self, onnx_model) -> None:
        from onnx import numpy_helper

        super().__init__()
        w = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in onnx_model.graph.initializer}
        self.conv1 = torch.nn.Conv2d(3, 16, 4, 4, bias=False)
        self.conv2 = torch.nn.Conv2d(16, 16, 4, 4, bias=False)
        self.fc = torch.nn.Linear(16 * 7 * 7, 512)
        self.conv1.weight.data, self.conv2.weight.data = w["conv1.w"], w["conv2.w"]
        self.fc.weight.data, self.fc.bias.data = w["fc.w"], w["fc.b"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(torch.relu(self.conv1(x))).flatten(1))


@pytest.fixture(scope="module")
def bed(tmp_path_factory, scrfd_dir: Path) -> Path:
    """A pack, a CurricularFace stand-in, reference photos and two videos: `faces` (a face too close
    for the detector at first, found after the grey padding; a moving face; frames without a
    face) and `noface`."""
    root = tmp_path_factory.mktemp("opens2v")
    pack = root / "pack"
    pack.mkdir()
    (pack / "scrfd.onnx").symlink_to(scrfd_dir / "models" / "scrfd.onnx")
    write_arcface(pack / "w600k_r50.onnx")
    write_arcface(root / "curricularface.onnx", seed=1)
    astronaut = skimage_data.astronaut()
    gen, refs = root / "gen", root / "refs"
    close = np.ascontiguousarray(astronaut[40:200, 160:290])  # the face fills the frame
    close = np.asarray(Image.fromarray(close).resize((256, 320)))
    noise = [np.random.default_rng(i).integers(0, 256, (256, 256, 3), dtype=np.uint8) for i in range(2)]
    write_video(gen / "faces.mp4", face_video_frames(close, 5, stamp=False) + face_video_frames(astronaut, 5, stamp=False)
                + noise)
    write_video(gen / "noface.mp4", noise)
    refs.mkdir()
    for name in ("faces", "noface"):
        Image.fromarray(astronaut).save(refs / f"{name}.png")
    return root


def _their_scores(theirs, bed: Path) -> dict[str, tuple[float, float]]:
    from insightface.app import FaceAnalysis

    facesim, _ = theirs
    analysis = FaceAnalysis(name=str(bed / "pack"), root=str(bed), providers=["CPUExecutionProvider"])
    analysis.prepare(ctx_id=-1, det_size=(320, 320))
    cur_model = TorchMirror(arcface_model(seed=1)).eval()
    scores = {}
    for name in ("faces",):  # `noface` scores 0 by construction in their code (empty lists)
        face, arc_ref = facesim.process_image(analysis, str(bed / "refs" / f"{name}.png"))
        cur_ref = facesim.inference(cur_model, face, "cpu")
        scores[name] = facesim.process_video(str(bed / "gen" / f"{name}.mp4"), analysis, cur_model, arc_ref, cur_ref,
                                             "cpu", num_frames=32)
    return scores


def test_opens2v_protocol_equals_theirs(theirs, bed: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores"
    assert cli.main(["score", str(bed / "gen"), "--references", str(bed / "refs"), "--pack", str(bed / "pack"),
                     "--protocol", "opens2v", "--curricularface", str(bed / "curricularface.onnx"),
                     "--provider", "cpu", "--device", "cpu", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    ours = {r["id"]: r for r in json.loads((out / "opens2v.json").read_text())["videos"]}
    expected = _their_scores(theirs, bed)
    for name, (cur, arc) in expected.items():
        summary = ours[name]["summary"]
        assert summary["frames"] == 32
        assert summary["curricularface_opens2v"] == pytest.approx(cur, rel=RTOL, abs=1e-7), name
        assert summary["arcface_opens2v"] == pytest.approx(arc, rel=RTOL, abs=1e-7), name
        print(f"{name}: ours Cur {summary['curricularface_opens2v']:.6f} Arc {summary['arcface_opens2v']:.6f} | "
              f"theirs Cur {cur:.6f} Arc {arc:.6f} | detection {summary['detection_rate']:.3f} "
              f"(padded {summary['padded_retries_found']}) | Cur misses=0 {summary['curricularface_misses_as_0']:.6f}")
    assert ours["noface"]["summary"]["frames_with_face"] == 0
    assert ours["noface"]["summary"]["curricularface_opens2v"] == ours["noface"]["summary"]["arcface_opens2v"] == 0.0
    faces = ours["faces"]
    frames = [row["frame"] for row in faces["frames"]]
    assert frames == opens2v.sample_indices(12) and len(set(frames)) == 12  # 32 samples of 12 frames
    summary = faces["summary"]
    assert summary["padded_retries_found"] > 0  # the grey padding found the close faces
    assert 0 < summary["detection_rate"] < 1  # the two noise frames are misses
    detected = [row["curricularface"] for row in faces["frames"] if row["face"]]
    assert summary["curricularface_misses_as_0"] == pytest.approx(sum(detected) / 32)
    assert summary["curricularface_detected_mean"] == pytest.approx(np.mean(detected))
    assert summary["curricularface_misses_as_0"] < summary["curricularface_detected_mean"]
    assert "FaceSim-Cur (OpenS2V)" in printed and "FaceSim-Arc (OpenS2V)" in printed and "31.56" in printed
    assert (out / "opens2v.md").read_text() in printed


def test_opens2v_needs_the_curricularface_model(bed: Path, tmp_path: Path, capsys) -> None:
    assert cli.main(["score", str(bed / "gen"), "--references", str(bed / "refs"), "--pack", str(bed / "pack"),
                     "--protocol", "opens2v", "--out", str(tmp_path / "s")]) == 1
    assert "--curricularface" in capsys.readouterr().err
