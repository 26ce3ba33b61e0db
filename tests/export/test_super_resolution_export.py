"""`python -m export sr`: checkpoints recognised by spandrel (random weights, two
architectures, .pth and .safetensors), verified graphs with dynamic sides, the facts in
the config, and clear errors for what cannot be served."""

import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.super_resolution import ImageExportError, export_sr
from services.runtime.repository import ModelRepository
from tests.fixtures.sr_models import build, write_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return write_checkpoints(tmp_path_factory.mktemp("sr_checkpoints"))


@pytest.mark.parametrize("kind,arch,scale", [("esrgan", "ESRGAN", 4), ("compact", "RealESRGAN Compact", 2)])
def test_export_reads_the_architecture_and_runs_at_any_size(checkpoints, tmp_path, kind, arch, scale):
    report = export_sr(checkpoints[kind], tmp_path, f"{kind}_sr")
    assert report.max_abs_error < 1e-3
    spec = ModelRepository(tmp_path).models[f"{kind}_sr"]
    p = spec.parameters
    assert p["genserve.pipeline"] == "image_to_image" and p["genserve.task"] == "super_resolution"
    assert (p["genserve.architecture"], int(p["genserve.scale"])) == (arch, scale)
    assert p["genserve.input_range"] == p["genserve.output_range"] == "0,1"
    assert len(p["genserve.source_sha256"]) == 64
    # An odd size nobody traced, against the PyTorch model.
    x = np.random.default_rng(1).uniform(0, 1, (1, 3, 37, 53)).astype(np.float32)
    got = ort.InferenceSession(str(report.onnx_path)).run(None, {"image": x})[0]
    with torch.no_grad():
        want = build(kind)(torch.from_numpy(x)).clamp(0, 1).numpy()
    assert got.shape == (1, 3, 37 * scale, 53 * scale)
    assert np.abs(got - want).max() < 1e-4


def test_a_state_dict_of_no_known_architecture_is_named(tmp_path):
    path = tmp_path / "mystery.pth"
    torch.save({"encoder.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ImageExportError, match="recognises no architecture"):
        export_sr(path, tmp_path / "repo", "mystery")


def test_checkpoints_are_read_as_published_and_other_files_refused(checkpoints, tmp_path):
    # BasicSR's training checkpoints keep the weights twice: the error lists them, the key picks one.
    state = build("compact").state_dict()
    torch.save({"params": state, "params_ema": state}, tmp_path / "net_g_latest.bin")
    with pytest.raises(ImageExportError, match=r"2 dicts of tensors.*'params_ema'.*--state-dict-key"):
        export_sr(tmp_path / "net_g_latest.bin", tmp_path / "repo", "m")
    exported = export_sr(tmp_path / "net_g_latest.bin", tmp_path / "repo", "m", state_dict_key="params_ema")
    assert exported.facts.scale == 2
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ImageExportError, match="no format read here"):
        export_sr(tmp_path / "model.onnx", tmp_path / "repo", "m")


def test_cli_exports_and_fails_with_a_message(checkpoints, tmp_path, capsys):
    from export.__main__ import main

    assert main(["sr", "--weights", str(checkpoints["compact"]), "--name", "c2", "--repository", str(tmp_path)]) == 0
    assert (tmp_path / "c2" / "config.pbtxt").exists() and "verified" in capsys.readouterr().out
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors")
    assert main(["sr", "--weights", str(tmp_path / "junk.safetensors"), "--name", "j",
                 "--repository", str(tmp_path)]) == 2
    assert "junk.safetensors" in capsys.readouterr().err


def test_spandrel_imports_beside_the_cpu_torch_in_a_fresh_process():
    """torchvision's C ops do not load beside the CPU torch; spandrel still imports (see
    export/torchvision_compat.py), and torchvision's own ops say why they cannot run."""
    code = ("from export.torchvision_compat import import_spandrel; s = import_spandrel(); import torch, torchvision;"
            "print(s.MAIN_REGISTRY.get('ESRGAN').architecture.name, torchvision.extension._has_ops())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == "ESRGAN"
