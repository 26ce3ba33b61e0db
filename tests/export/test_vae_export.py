"""Export of AutoencoderKL folders: two verified graphs with the VAE contract of export/vae.py."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.diffusers_folder import UnsupportedFolder, detect_family
from export.vae import export_vae
from export.verification import vae_activation
from services.engine.memory import ACTIVATION_BYTES_PARAMETER
from services.runtime.repository import ModelRepository, parse_model_config
from tests.fixtures.vae_folder import build_random_vae_folder

quiet = dict(progress=lambda _: None)


@pytest.fixture(scope="module")
def rgb(tmp_path_factory):
    """(folder, repository): RGB, 4 latent channels, scale factor 2, shift_factor set."""
    folder = build_random_vae_folder(tmp_path_factory.mktemp("vae_rgb"))
    repo = tmp_path_factory.mktemp("vae_rgb_repository")
    reports = export_vae(folder, repo, "vae_rgb", max_batch_size=8, **quiet)
    assert [r.name for r in reports] == ["vae_rgb_vae_encoder", "vae_rgb_vae_decoder"]
    assert all(r.max_abs_error < 1e-3 and not r.external_data for r in reports)
    return folder, repo


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """(folder, repository): 1 channel, 2 latent channels, scale factor 4, no shift_factor."""
    folder = build_random_vae_folder(tmp_path_factory.mktemp("vae_gray"), seed=1, image_channels=1,
                                     latent_channels=2, levels=3, shift_factor=None, force_upcast=True)
    repo = tmp_path_factory.mktemp("vae_gray_repository")
    export_vae(folder, repo, "vae_gray", **quiet)
    return folder, repo


def _load(folder):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder)).eval()


def _run(repo, model, inputs):
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)[0]


def test_configs_carry_the_contract(rgb):
    _, repo = rgb
    models = ModelRepository(repo).models
    assert set(models) == {"vae_rgb_vae_encoder", "vae_rgb_vae_decoder"}
    enc, dec = models["vae_rgb_vae_encoder"], models["vae_rgb_vae_decoder"]
    assert [(t.name, t.dtype, t.dims) for t in enc.inputs] == [("sample", np.float32, (3, -1, -1))]
    assert [(t.name, t.dtype, t.dims) for t in enc.outputs] == [("latent_parameters", np.float32, (8, -1, -1))]
    assert [(t.name, t.dtype, t.dims) for t in dec.inputs] == [("latent_sample", np.float32, (4, -1, -1))]
    assert [(t.name, t.dtype, t.dims) for t in dec.outputs] == [("sample", np.float32, (3, -1, -1))]
    assert enc.max_batch_size == dec.max_batch_size == 8
    shared = {"genserve.pipeline": "vae", "genserve.pipeline_name": "vae_rgb", "genserve.vae_scale_factor": "2",
              "genserve.size_multiple": "2", "genserve.scaling_factor": "0.5", "genserve.shift_factor": "0.0625",
              "genserve.image_channels": "3", "genserve.latent_channels": "4", "genserve.sample_size": "16",
              "genserve.sample_height": "16", "genserve.sample_width": "16", "genserve.force_upcast": "False",
              "genserve.precision": "fp32"}
    # The serving side bounds rows per call by the activation memory of one row at the native size.
    from diffusers import AutoencoderKL

    config = AutoencoderKL.from_pretrained(rgb[0]).config
    shared[ACTIVATION_BYTES_PARAMETER] = str(vae_activation(config, (8, 8)).row_bytes((8, 8)))
    assert enc.parameters == {**shared, "genserve.component": "vae_encoder"}
    assert dec.parameters == {**shared, "genserve.component": "vae_decoder"}
    # Triton's warm-up request runs at the native size (a 1x1 latent would not decode to the contract's shapes).
    for model, tensor, dims in (("vae_rgb_vae_decoder", "latent_sample", [4, 8, 8]),
                                ("vae_rgb_vae_encoder", "sample", [3, 16, 16])):
        config = parse_model_config((repo / model / "config.pbtxt").read_text())
        assert list(config.model_warmup[0].inputs[tensor].dims) == dims


def test_one_channel_config_omits_a_null_shift_factor(gray):
    _, repo = gray
    models = ModelRepository(repo).models
    enc, dec = models["vae_gray_vae_encoder"], models["vae_gray_vae_decoder"]
    assert enc.inputs[0].dims == (1, -1, -1) and enc.outputs[0].dims == (4, -1, -1)
    assert dec.inputs[0].dims == (2, -1, -1) and dec.outputs[0].dims == (1, -1, -1)
    assert "genserve.shift_factor" not in dec.parameters
    assert dec.parameters["genserve.vae_scale_factor"] == dec.parameters["genserve.size_multiple"] == "4"
    assert dec.parameters["genserve.sample_size"] == "32" and dec.parameters["genserve.force_upcast"] == "True"
    assert dec.parameters["genserve.image_channels"] == "1" and dec.parameters["genserve.latent_channels"] == "2"


@pytest.mark.parametrize("which", ["rgb", "gray"])
def test_graphs_match_pytorch_at_other_batch_and_non_square_sizes(which, request):
    folder, repo = request.getfixturevalue(which)
    vae, name = _load(folder), f"vae_{which}"
    c_img, c_lat = vae.config.in_channels, vae.config.latent_channels
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    rng = np.random.default_rng(5)
    for batch, h, w in ((1, 3, 5), (5, 8, 2)):  # latent sides; images are f times larger
        image = rng.uniform(-1, 1, (batch, c_img, h * f, w * f)).astype(np.float32)
        params = _run(repo, f"{name}_vae_encoder", {"sample": image})
        with torch.no_grad():
            want = vae.encode(torch.from_numpy(image)).latent_dist.parameters.numpy()
        assert params.shape == (batch, 2 * c_lat, h, w)
        np.testing.assert_allclose(params, want, atol=1e-4, rtol=1e-3)

        latents = rng.standard_normal((batch, c_lat, h, w), dtype=np.float32)
        decoded = _run(repo, f"{name}_vae_decoder", {"latent_sample": latents})
        with torch.no_grad():
            want = vae.decode(torch.from_numpy(latents)).sample.numpy()
        assert decoded.shape == (batch, c_img, h * f, w * f)
        np.testing.assert_allclose(decoded, want, atol=1e-4, rtol=1e-3)


def test_encoder_output_is_mean_then_log_variance(gray):
    """The caller splits the channels itself: the first half is the mean the decoder wants."""
    folder, repo = gray
    vae = _load(folder)
    image = np.random.default_rng(0).uniform(-1, 1, (2, 1, 32, 32)).astype(np.float32)
    params = _run(repo, "vae_gray_vae_encoder", {"sample": image})
    mean, logvar = np.split(params, 2, axis=1)
    with torch.no_grad():
        post = vae.encode(torch.from_numpy(image)).latent_dist
    np.testing.assert_allclose(mean, post.mean.numpy(), atol=1e-4)
    np.testing.assert_allclose(np.exp(0.5 * logvar), post.std.numpy(), rtol=1e-3, atol=1e-5)


def test_cli_exports_a_vae_folder(tmp_path):
    from export.__main__ import main

    folder = build_random_vae_folder(tmp_path / "vae", seed=2, levels=1)
    assert detect_family(folder) == "vae"
    repo = tmp_path / "repository"
    assert main(["vae", "--folder", str(folder), "--name", "cli_vae", "--repository", str(repo),
                 "--max-batch-size", "4"]) == 0
    models = ModelRepository(repo).models
    assert set(models) == {"cli_vae_vae_encoder", "cli_vae_vae_decoder"}
    assert models["cli_vae_vae_decoder"].max_batch_size == 4
    assert models["cli_vae_vae_decoder"].parameters["genserve.vae_scale_factor"] == "1"


def test_cli_refuses_a_folder_that_is_not_a_vae(tmp_path, capsys):
    from export.__main__ import main

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel"}))
    assert main(["vae", "--folder", str(tmp_path), "--name", "x", "--repository", str(tmp_path / "r")]) == 2
    assert "ControlNetModel" in capsys.readouterr().err


def test_a_pipeline_folders_vae_is_exported_alone(tmp_path):
    """A Stable Diffusion folder's vae/ gives the same graphs as the SD exporter's VAE graphs."""
    from export.diffusers_folder import export_folder
    from tests.fixtures.sd_folder import build_random_sd_folder

    folder = build_random_sd_folder(tmp_path / "sd")
    reports = export_vae(folder, tmp_path / "repository", "sd_vae", **quiet)
    assert [r.name for r in reports] == ["sd_vae_vae_encoder", "sd_vae_vae_decoder"]
    dec = ModelRepository(tmp_path / "repository").models["sd_vae_vae_decoder"]
    assert dec.parameters["genserve.pipeline"] == "vae" and dec.parameters["genserve.image_channels"] == "3"
    vae = _load(folder / "vae")
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 6), dtype=np.float32)
    with torch.no_grad():
        want = vae.decode(torch.from_numpy(latents)).sample.numpy()
    np.testing.assert_allclose(_run(tmp_path / "repository", "sd_vae_vae_decoder", {"latent_sample": latents}),
                               want, atol=1e-4, rtol=1e-3)

    # A folder holding only vae/ (no model_index.json) is detected as a VAE and goes to export_vae.
    only_vae = tmp_path / "only_vae"
    (only_vae / "vae").mkdir(parents=True)
    for f in (folder / "vae").iterdir():
        (only_vae / "vae" / f.name).write_bytes(f.read_bytes())
    assert detect_family(only_vae) == "vae"
    family, reports = export_folder(only_vae, tmp_path / "repository2", "only", **quiet)
    assert family == "vae" and len(reports) == 2


def test_refuses_folders_without_an_autoencoder(tmp_path):
    from export.vae import vae_folder

    with pytest.raises(UnsupportedFolder, match="no AutoencoderKL"):
        vae_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(UnsupportedFolder, match="UNet2DModel"):
        vae_folder(tmp_path)


def test_demo_vae_exports_as_python_m_export_demo_does(tmp_path):
    """zoo/checkpoints/vae_digits: 1x32x32 images <-> 2x4x4 latents, decoded noise through ONNX."""
    from export.__main__ import DEMO_VAE
    from export.diffusers_folder import export_folder

    (folder, name), = DEMO_VAE.items()
    if not folder.exists():
        pytest.skip(f"{folder} not trained yet (python -m zoo.vae.train)")
    family, _ = export_folder(folder, tmp_path, name, family="vae", **quiet)
    assert family == "vae"
    dec = ModelRepository(tmp_path).models[f"{name}_vae_decoder"]
    assert dec.inputs[0].dims == (2, -1, -1) and dec.parameters["genserve.sample_size"] == "32"
    assert dec.parameters["genserve.vae_scale_factor"] == "8"
    z = np.random.default_rng(0).standard_normal((4, 2, 4, 4), dtype=np.float32)
    images = _run(tmp_path, f"{name}_vae_decoder", {"latent_sample": z})
    with torch.no_grad():
        want = _load(folder).decode(torch.from_numpy(z)).sample.numpy()
    assert images.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(images, want, atol=1e-4, rtol=1e-3)
