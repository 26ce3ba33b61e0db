"""Export of a GAN generator: dynamic batch, parity with PyTorch, a loadable model dir."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main
from export.gan import export_gan
from export.onnx_export import ParityError, verify_onnx
from services.runtime.repository import ModelRepository
from zoo.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    report = export_gan("cgan_digits", repo, "cgan", version=2, max_batch_size=8)
    return repo, report


def test_export_writes_a_triton_model_dir(exported):
    repo, report = exported
    assert report.onnx_path == repo / "cgan" / "2" / "model.onnx"
    assert report.max_abs_error < 1e-4
    spec = ModelRepository(repo)["cgan"]
    assert spec.version == "2" and spec.max_batch_size == 8
    assert [t.name for t in spec.inputs] == ["z", "class_label"]
    assert spec.parameters["genserve.num_classes"] == "10"
    assert spec.parameters["genserve.latent_dim"] == str(load_checkpoint("cgan_digits").latent_dim)


@pytest.mark.parametrize("batch", [1, 7, 8])
def test_graph_matches_pytorch_at_any_batch_size(exported, batch):
    _, report = exported
    generator = load_checkpoint("cgan_digits")
    rng = np.random.default_rng(batch)
    z = rng.standard_normal((batch, generator.latent_dim), dtype=np.float32)
    labels = rng.integers(0, 10, batch)
    got = ort.InferenceSession(str(report.onnx_path)).run(None, {"z": z, "class_label": labels})[0]
    with torch.no_grad():
        want = generator(torch.from_numpy(z), torch.from_numpy(labels)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_parity_check_fails_loudly_on_a_wrong_graph(exported):
    _, report = exported
    generator = load_checkpoint("cgan_digits")
    with torch.no_grad():
        for p in generator.parameters():
            p.add_(0.05)
    inputs = {"z": np.ones((2, generator.latent_dim), np.float32), "class_label": np.array([1, 2])}
    with pytest.raises(ParityError, match="max abs error"):
        verify_onnx(generator, report.onnx_path, inputs)


def test_cli_exports_every_demo_model(tmp_path, capsys):
    assert main(["demo", "--repository", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cgan_digits" in out and "dcgan_digits" in out and "dcgan_faces" in out and "max abs error" in out
    assert set(ModelRepository(tmp_path).models) >= {"cgan_digits", "dcgan_digits", "dcgan_faces"}
