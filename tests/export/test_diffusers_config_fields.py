"""diffusers config fields read the way diffusers reads them: `sample_size` is an int or
[height, width] for every exporter (SD's U-Net, the VAE, SDXL, DDPM), and a U-Net whose
channels are not the VAE's latents is refused by name."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.core import sample_size_hw
from export.errors import UnsupportedFolder
from services.runtime.repository import ModelRepository


@pytest.mark.parametrize("value,hw", [(64, (64, 64)), ([96, 64], (96, 64)), ((32, 48), (32, 48))])
def test_sample_size_is_an_int_or_height_and_width(value, hw):
    assert sample_size_hw(value, "unet/config.json") == hw


@pytest.mark.parametrize("value", [None, 0, [64], [64, 64, 3], [64.0, 32], "64"])
def test_other_sample_sizes_are_refused_by_name(value):
    with pytest.raises(UnsupportedFolder, match=r"unet/config.json: sample_size .* neither a positive int nor "
                                                r"\[height, width\]"):
        sample_size_hw(value, "unet/config.json")


@pytest.mark.slow
def test_sd_with_a_non_square_sample_size_exports_and_serves_its_native_size(tmp_path):
    """[h, w] sample sizes (valid in diffusers) crashed unet_inputs with a TypeError."""
    from diffusers import UNet2DConditionModel

    from export.stable_diffusion import export_stable_diffusion
    from services.pipelines.pipeline_stable_diffusion import discover_stable_diffusion
    from services.pipelines.pipeline_vae import discover as discover_vaes
    from tests.fixtures.sd_folder import build_random_sd_folder

    folder = build_random_sd_folder(tmp_path / "sd", unet_sample_size=[8, 16], vae_sample_size=[16, 32])
    repo = tmp_path / "repo"
    export_stable_diffusion(folder, repo, "wide", progress=lambda _: None, deepcache=False,
                            controlnet_inputs=False)  # fed below without residuals
    models = ModelRepository(repo).models
    p = models["wide_unet"].parameters
    assert (p["genserve.sample_height"], p["genserve.sample_width"]) == ("8", "16")
    assert "genserve.sample_size" not in p  # no single side to name
    spec = discover_stable_diffusion(models)["wide"].spec()
    assert (spec.native_height, spec.native_width) == (16, 32)  # latents x the VAE factor 2
    vae = discover_vaes(models)["wide"]
    assert vae.native_size == 32  # a pipeline's VAE is sized by the U-Net's larger side
    # The graph at the native, non-square latent size, against PyTorch.
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 16), dtype=np.float32),
             "timestep": np.array([900.0, 10.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 12, 48), dtype=np.float32)}
    got = ort.InferenceSession(str(models["wide_unet"].model_file)).run(["noise_pred"], feeds)[0]
    with torch.no_grad():
        want = unet(*(torch.from_numpy(v) for v in feeds.values())).sample.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_a_vae_with_height_and_width_traces_at_both(tmp_path):
    from export.vae import export_vae
    from tests.fixtures.vae_folder import build_random_vae_folder

    folder = build_random_vae_folder(tmp_path / "vae", sample_size=[16, 24])
    export_vae(folder, tmp_path / "repo", "wide", progress=lambda _: None)
    p = ModelRepository(tmp_path / "repo").models["wide_vae_decoder"].parameters
    assert (p["genserve.sample_size"], p["genserve.sample_height"], p["genserve.sample_width"]) == ("16", "16", "24")


def test_a_unet_that_does_not_denoise_the_vae_latents_is_refused(tmp_path):
    from export.stable_diffusion import export_stable_diffusion
    from tests.fixtures.sd_folder import build_random_sd_folder

    folder = build_random_sd_folder(tmp_path / "sd", unet_in_channels=9)  # SD inpainting's U-Net
    with pytest.raises(UnsupportedFolder, match="takes 9 channels but the VAE's latents have 4 "
                                                r"\(an inpainting U-Net"):
        export_stable_diffusion(folder, tmp_path / "repo", "inpaint", progress=lambda _: None)
    assert not (tmp_path / "repo").exists()
