"""Torch-free pipelines: each turns validated request parameters into pixels by calling
an InferenceBackend. They know nothing of HTTP.

Each family (services.families) names the function building its pipelines from the
repository. A diffusion family's is its module's `pipelines(backend) -> {name:
DiffusionPipeline}`, which finds its graphs by `genserve.pipeline`; the service runs one step
engine per pipeline found, whatever its family.
"""

from __future__ import annotations

from services import families


def diffusion_pipelines(backend, settings) -> dict:
    found = {}
    for family in families.FAMILIES:
        if not family.step_engine:
            continue
        for name, pipeline in family.build_pipelines(backend, settings).items():
            if name in found:
                raise ValueError(f"two diffusion pipelines are named {name!r} in the repository")
            found[name] = pipeline
    return found


def gan_pipelines(backend) -> dict:
    from services.pipelines.pipeline_gan import GANPipeline

    return {name: GANPipeline(backend, name) for name, spec in sorted(backend.models().items())
            if spec.parameters.get("genserve.pipeline") == "gan"}


def image_to_image_pipelines(backend, settings) -> dict:
    """SR and translators, each call bounded by GENSERVE_IMAGE_CALL_MB; on the embedded backend
    one model call at a time (image work and diffusion steps share the CPU there)."""
    from services.pipelines.pipeline_image_to_image import image_to_image_pipelines as build

    return build(backend, settings.images.call_mb << 20, one_call_at_a_time=settings.backend == "onnxruntime")
