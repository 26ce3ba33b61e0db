"""The pretrained generators packages ship (export/pretrained.py), exported as `export demo` does
and as a user runs `python -m export gan` on the package's files, against PyTorch loaded the way
the package itself loads them."""

from __future__ import annotations

import asyncio
import zipfile

import numpy as np
import pytest
import torch

from export.__main__ import main
from export.pretrained import PACKAGED_GANS, packaged_gan_exports
from export.triton_config import DeploymentTarget
from services.pipelines.pipeline_gan import GANPipeline
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository

FACES = PACKAGED_GANS["dcgan_faces"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """(the package's generator in PyTorch, a repository as `export demo` writes it)."""
    folder = FACES.folder()
    assert folder is not None, f"{FACES.distribution} is installed by make install (requirements-pretrained.txt)"
    from gan_face_generate.models import Generator  # the package's own loading, as its inference.py does

    reference = Generator(**FACES.init_args)
    reference.load_state_dict(torch.load(folder / FACES.weights, map_location="cpu")["netG_state_dict"])
    repo = tmp_path_factory.mktemp("pretrained")
    exports = dict(packaged_gan_exports(repo, DeploymentTarget()))
    exports["dcgan_faces"]()
    return reference.eval(), repo


def test_the_weights_are_as_published_a_cuda_saved_torch_zip_with_a_nested_state_dict():
    with zipfile.ZipFile(FACES.folder() / FACES.weights) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    assert b"netG_state_dict" in pickled and b"cuda:0" in pickled


def test_served_faces_equal_pytorch_and_the_config_records_the_licence(faces):
    reference, repo = faces
    spec = ModelRepository(repo)["dcgan_faces"]
    p = spec.parameters
    assert p["genserve.latent_shape"] == "100,1,1" and tuple(spec.outputs[0].dims) == (3, 64, 64)
    assert p["genserve.license"].startswith("MIT") and "DigiFace-1M" in p["genserve.license"]
    assert "gan-face-generate 1.1.1" in p["genserve.source"]
    pipeline = GANPipeline(OnnxRuntimeBackend(ModelRepository(repo)), "dcgan_faces")
    out = asyncio.run(pipeline(11, 5, 0.8))
    z = np.stack([0.8 * np.random.default_rng(11 + i).standard_normal((100, 1, 1), dtype=np.float32)
                  for i in range(5)])
    with torch.no_grad():
        want = reference(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(out.images, want, atol=1e-4, rtol=1e-3)
    assert out.images.std() > 0.2  # faces, not a flat image


def test_the_user_command_exports_the_same_generator(faces, tmp_path):
    reference, _ = faces
    assert main([*FACES.command("faces_by_hand", FACES.folder()), "--repository", str(tmp_path)]) == 0
    pipeline = GANPipeline(OnnxRuntimeBackend(ModelRepository(tmp_path)), "faces_by_hand")
    out = asyncio.run(pipeline(3, 2, 1.0))
    z = np.stack([np.random.default_rng(3 + i).standard_normal((100, 1, 1), dtype=np.float32) for i in range(2)])
    with torch.no_grad():
        np.testing.assert_allclose(out.images, reference(torch.from_numpy(z)).numpy(), atol=1e-4, rtol=1e-3)
