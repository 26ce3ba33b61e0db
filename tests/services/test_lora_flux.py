"""LoRA adapters on a FLUX pipeline, served in process against diffusers' FluxPipeline.

A tiny random FLUX folder (tests/fixtures/flux_folder.py) with a PEFT-format transformer LoRA and
a kohya/BFL-format one (fused q/k/v, single-block projections, alphas: diffusers converts them) is
exported, the adapters stored beside its transformer (`export lora`, matched to the dynamo
exporter's nodes by their module scopes) and the transformer given slots (`export lora-slots`).
Images must equal diffusers' `load_lora_weights` + `set_adapters`, and requests with different
adapter sets batched in the engine must each equal that request alone.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
import torch

from services.engine.engine import DiffusionEngine, EngineConfig
from services.pipelines.diffusion import DiffusionRequest, initial_latents
from services.pipelines.pipeline_flux import pack, pipelines
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.engine import drain
from tests.fixtures.images import psnr, to_uint8

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


def generate(pipeline, request) -> np.ndarray:
    return asyncio.run(pipeline(request)).images


def diffusers_images(flux, lora, num_images=2) -> np.ndarray:
    ours, reference, files, _ = flux
    spec = ours.spec
    reference.unload_lora_weights()
    for name, _ in lora:
        reference.load_lora_weights(str(files[name]), adapter_name=name)
    if lora:
        reference.set_adapters([n for n, _ in lora], [s for _, s in lora])
    shape = (spec.latent_channels, SIDE // spec.vae_scale_factor, SIDE // spec.vae_scale_factor)
    latents = torch.from_numpy(pack(np.stack(initial_latents(SEED, num_images, shape))))
    with torch.no_grad():
        return reference(PROMPT, num_inference_steps=STEPS, height=SIDE, width=SIDE, guidance_scale=3.5,
                         max_sequence_length=T5_LENGTH, num_images_per_prompt=num_images, latents=latents,
                         output_type="np").images


def test_the_adapters_are_stored_beside_the_transformer_for_its_nodes(flux):
    repo = flux[3]
    for name, layers in (("peft", None), ("kohya", 6)):  # kohya: q, k, v split from the fused qkv
        manifest = json.loads((repo / f"{NAME}_transformer" / "adapters" / name / "adapter.json").read_text())
        assert manifest["graphs"] == [f"{NAME}_transformer"]
        if layers is not None:
            assert len(manifest["layers"]) == 2 * 3 + 2, manifest["layers"]


@pytest.mark.parametrize("lora", [[("peft", 0.8)], [("kohya", 1.0)], [("peft", 0.5), ("kohya", -0.7)]],
                         ids=["peft", "kohya", "both"])
def test_an_image_with_adapters_matches_diffusers_at_the_same_scales(flux, lora):
    ours = flux[0]
    got = to_uint8(generate(ours, req(lora, num_images=2)).transpose(0, 2, 3, 1))
    want = np.clip(np.rint(diffusers_images(flux, lora) * 255), 0, 255)
    assert psnr(got, want) >= 35
    plain = to_uint8(generate(ours, req(num_images=2)).transpose(0, 2, 3, 1))
    assert psnr(got, plain) < 30  # the adapters changed the image


def test_requests_with_different_adapter_sets_in_one_batch_equal_each_alone(flux):
    ours = flux[0]
    sets = [[], [("peft", 0.8)], [("kohya", 0.6)], [("peft", 0.3), ("kohya", 1.2)]]
    alone = [generate(ours, req(lora, seed=SEED + i)) for i, lora in enumerate(sets)]

    async def batched():
        engine = DiffusionEngine(ours, EngineConfig(32, 10_000), start_loop=False)
        handles = [engine.submit(req(lora, seed=SEED + i), timeout_s=600) for i, lora in enumerate(sets)]
        await drain(engine, handles)
        assert engine.iterations == STEPS
        return [h.result.images for h in handles]

    for lora, one, many in zip(sets, alone, asyncio.run(batched())):
        assert psnr(one, many, peak=2.0) >= 50, lora
