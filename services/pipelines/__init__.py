"""Torch-free pipelines: each turns validated request parameters into pixels by calling
an InferenceBackend. They know nothing of HTTP.

A diffusion family is a module with `pipelines(backend) -> {name: DiffusionPipeline}`
that finds its graphs in the repository (by `genserve.pipeline`); DIFFUSION_FAMILIES lists
them, and the service runs one step engine per pipeline found, whatever its family.
"""

from __future__ import annotations

import importlib

DIFFUSION_FAMILIES = (
    "services.pipelines.pipeline_stable_diffusion",
    "services.pipelines.pipeline_stable_diffusion_xl",
    "services.pipelines.pipeline_ddpm",
    "services.pipelines.pipeline_flux",
)


def diffusion_pipelines(backend) -> dict:
    found = {}
    for module in DIFFUSION_FAMILIES:
        for name, pipeline in importlib.import_module(module).pipelines(backend).items():
            if name in found:
                raise ValueError(f"two diffusion pipelines are named {name!r} in the repository")
            found[name] = pipeline
    return found


def gan_pipelines(backend) -> dict:
    from services.pipelines.pipeline_gan import GANPipeline

    return {name: GANPipeline(backend, name) for name, spec in sorted(backend.models().items())
            if spec.parameters.get("genserve.pipeline") == "gan"}
