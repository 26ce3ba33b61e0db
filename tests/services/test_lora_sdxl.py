"""LoRA adapters on an SDXL pipeline, served in process against diffusers.

A tiny random SDXL folder (tests/fixtures/sdxl_folder.py) with a PEFT-format LoRA (U-Net, both
text encoders, `text_encoder_2.` keys) and a kohya-format one (`lora_te1_` / `lora_te2_` on every
encoder layer, a LoCon conv) is exported, its adapters stored (`export lora`) and its U-Net and
both text encoders given slots (`export lora-slots`). Images must equal diffusers'
`load_lora_weights` + `set_adapters` at the same scales, and requests with different adapter sets
batched in the engine must each equal that request alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_stable_diffusion_xl import pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.lora_family import LoraFamily, LoraFamilyTests, use_adapters

pytestmark = pytest.mark.slow
NAME, PROMPT, NEGATIVE, STEPS, SEED = "hid_sdxl", "a photo of a red cat", "blue", 4, 7


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(our pipeline, diffusers' pipeline, LoRA files, repository)."""
    from diffusers import StableDiffusionXLPipeline

    import export.torchvision_compat  # noqa: F401
    from export.__main__ import main
    from export.lora import export_lora
    from export.stable_diffusion_xl import export_stable_diffusion_xl
    from tests.fixtures.lora_files import write_sdxl_loras
    from tests.fixtures.sdxl_folder import build_random_sdxl_folder

    tmp = tmp_path_factory.mktemp("lora_sdxl")
    folder = build_random_sdxl_folder(tmp / "folder", seed=11)
    repo = tmp / "repository"
    export_stable_diffusion_xl(folder, repo, NAME, progress=lambda _: None)
    files = write_sdxl_loras(folder, tmp / "loras")
    for name, path in files.items():
        export_lora(path, repo, NAME, name, progress=lambda _: None)
    assert main(["lora-slots", "--pipeline", NAME, "--repository", str(repo)]) == 0
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    ours = pipelines(backend)[NAME]
    ours.adapters.library.preload()
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    return ours, reference, files, repo


def req(lora=(), seed=SEED, num_images=1) -> DiffusionRequest:
    return DiffusionRequest(prompt=PROMPT, negative_prompt=NEGATIVE, num_images=num_images,
                            num_inference_steps=STEPS, guidance_scale=5.0, scheduler="euler", seed=seed,
                            lora=list(lora))


def diffusers_images(sdxl, lora, num_images=2) -> np.ndarray:
    import torch

    ours, reference, files, _ = sdxl
    spec = ours.spec
    use_adapters(reference, files, lora)
    shape = (spec.latent_channels, spec.native_height // spec.vae_scale_factor,
             spec.native_width // spec.vae_scale_factor)
    latents = torch.from_numpy(np.stack(initial_latents(SEED, num_images, shape)))
    with torch.no_grad():
        return reference(PROMPT, negative_prompt=NEGATIVE, num_images_per_prompt=num_images,
                         num_inference_steps=STEPS, guidance_scale=5.0, latents=latents, output_type="np").images


def test_the_adapters_act_on_the_unet_and_both_text_encoders(sdxl):
    repo = sdxl[3]
    for name in ("peft", "kohya"):
        manifest = json.loads((repo / f"{NAME}_unet" / "adapters" / name / "adapter.json").read_text())
        assert manifest["graphs"] == [f"{NAME}_text_encoder", f"{NAME}_text_encoder_2", f"{NAME}_unet"], name


class TestSDXLAdapters(LoraFamilyTests):
    @pytest.fixture(scope="class")
    def lora_family(self, sdxl):
        return LoraFamily(sdxl[0], req, lambda lora, n: diffusers_images(sdxl, lora, n), STEPS)
