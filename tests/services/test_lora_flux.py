"""LoRA adapters on a FLUX pipeline, served in process against diffusers' FluxPipeline.

A tiny random FLUX folder (tests/fixtures/flux_folder.py) with a PEFT-format transformer LoRA and
a kohya/BFL-format one (fused q/k/v, single-block projections, alphas: diffusers converts them) is
exported, the adapters stored beside its transformer (`export lora`, matched to the dynamo
exporter's nodes by their module scopes) and the transformer given slots (`export lora-slots`).
Images must equal diffusers' `load_lora_weights` + `set_adapters`, and requests with different
adapter sets batched in the engine must each equal that request alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_flux import pack, pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.lora_family import LoraFamily, LoraFamilyTests, use_adapters

pytestmark = pytest.mark.slow
NAME, PROMPT, STEPS, SEED, T5_LENGTH, SIDE = "hid_flux", "a photo of a red cat", 4, 7, 20, 16


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(our pipeline, diffusers' pipeline, LoRA files, repository)."""
    from diffusers import FluxPipeline

    import export.torchvision_compat  # noqa: F401
    from export.__main__ import main
    from export.flux import export_flux
    from export.lora import export_lora
    from tests.fixtures.flux_folder import build_random_flux_folder
    from tests.fixtures.lora_files import write_flux_loras

    tmp = tmp_path_factory.mktemp("lora_flux")
    folder = build_random_flux_folder(tmp / "folder", seed=9, t5_max_length=32)
    repo = tmp / "repository"
    export_flux(folder, repo, NAME, progress=lambda _: None, max_sequence_length=T5_LENGTH, native_size=SIDE)
    files = write_flux_loras(folder, tmp / "loras")
    for name, path in files.items():
        export_lora(path, repo, NAME, name, progress=lambda _: None)
    assert main(["lora-slots", "--pipeline", NAME, "--repository", str(repo)]) == 0
    ours = pipelines(OnnxRuntimeBackend(ModelRepository(repo)))[NAME]
    ours.adapters.library.preload()
    reference = FluxPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return ours, reference, files, repo


def req(lora=(), seed=SEED, num_images=1) -> DiffusionRequest:
    return DiffusionRequest(prompt=PROMPT, num_images=num_images, num_inference_steps=STEPS, guidance_scale=3.5,
                            scheduler="flow_match_euler", seed=seed, height=SIDE, width=SIDE, lora=list(lora))


def diffusers_images(flux, lora, num_images=2) -> np.ndarray:
    ours, reference, files, _ = flux
    spec = ours.spec
    use_adapters(reference, files, lora)
    shape = (spec.latent_channels, SIDE // spec.vae_scale_factor, SIDE // spec.vae_scale_factor)
    latents = torch.from_numpy(pack(np.stack(initial_latents(SEED, num_images, shape))))
    with torch.no_grad():
        return reference(PROMPT, num_inference_steps=STEPS, height=SIDE, width=SIDE, guidance_scale=3.5,
                         max_sequence_length=T5_LENGTH, num_images_per_prompt=num_images, latents=latents,
                         output_type="np").images


def test_the_adapters_are_stored_beside_the_transformer_for_its_nodes(flux):
    def manifest(name):
        return json.loads((flux[3] / f"{NAME}_transformer" / "adapters" / name / "adapter.json").read_text())

    assert manifest("peft")["graphs"] == manifest("kohya")["graphs"] == [f"{NAME}_transformer"]
    # kohya's two fused qkv layers become q, k and v each (as diffusers splits them), beside the
    # attention output and the single block's linear2
    assert len(manifest("kohya")["layers"]) == 2 * 3 + 2


class TestFluxAdapters(LoraFamilyTests):
    @pytest.fixture(scope="class")
    def lora_family(self, flux):
        return LoraFamily(flux[0], req, lambda lora, n: diffusers_images(flux, lora, n), STEPS)
