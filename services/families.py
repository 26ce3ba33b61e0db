"""Every model family served here, described once: what it is called, which diffusers classes
it exports, how its pipelines are built from a repository, what it can do and where it shows.

Every list of families (the routers mounted, the text-conditioned and latent families, the
models merged per call, the GAN hand-off, the diffusers folder dispatch) is derived from
FAMILIES; tests/services/test_families.py walks it and checks each family appears everywhere
it should. Adding a family is its descriptor here plus its own files.

One table rather than a descriptor in each family's module: the family modules (routers,
pipelines, exporters) read these lists themselves, and the exporters import torch, so a
registry that imported them would be a cycle and would put torch on the serving path. Entry
points are therefore dotted strings ("module:function"), imported only when called.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Family:
    name: str  # `genserve.pipeline` in its configs; `pipeline` in GET /v1/models
    router: str  # the module whose `router` serves it and whose `describe(ctx)` lists its models
    # "module:function" building {model name: pipeline} from the backend, or from the backend
    # and the service's Settings where `pipelines_take_settings`
    pipelines: str
    export: str  # "module:function": its exporter (for diffusers folders, what export_folder calls)
    export_commands: tuple[str, ...]  # the `python -m export` subcommands that export it
    diffusers_pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s exported as this family
    diffusers_models: tuple[str, ...] = ()  # single-model folders' config.json `_class_name`s
    export_options: tuple[str, ...] = ()  # export_folder's family-specific options its exporter takes
    default_model: str | None = None  # the GENSERVE_DEFAULT_<X>_MODEL a request naming no model falls back on
    text_conditioned: bool = False  # prompts: /v1/txt2img and kin (services.routers.diffusion)
    latent_vae: bool = False  # its VAE is served on /v1/vae/*, under the pipeline's name
    step_engine: bool = False  # denoised step by step: one DiffusionEngine per pipeline
    single_pass: bool = False  # one model call per request: the embedded backend merges concurrent calls
    gan: bool = False  # sampled on /v1/gan/generate (the gan router hands other families to their router)
    playground_tab: str | None = None  # the playground tab offering its models (static/index.html)
    pipelines_take_settings: bool = False

    def build_pipelines(self, backend, settings) -> dict:
        build = load(self.pipelines)
        return build(backend, settings) if self.pipelines_take_settings else build(backend)


def load(entry_point: str) -> Callable[..., Any]:
    """"module:function" -> the function (importing its module now, not before)."""
    module, _, function = entry_point.partition(":")
    return getattr(importlib.import_module(module), function)


FAMILIES = (
    Family("gan", router="services.routers.gan", pipelines="services.pipelines:gan_pipelines",
           export="export.gan:export_generator", export_commands=("gan",), default_model="gan", single_pass=True,
           gan=True, playground_tab="tab-gan"),
    Family("stylegan", router="services.routers.stylegan",
           pipelines="services.pipelines.pipeline_stylegan:stylegan_pipelines",
           export="export.stylegan:export_stylegan", export_commands=("stylegan",), default_model="gan",
           single_pass=True, gan=True, playground_tab="tab-style"),
    Family("stable_diffusion", router="services.routers.diffusion",
           pipelines="services.pipelines.pipeline_stable_diffusion:pipelines",
           export="export.stable_diffusion:export_stable_diffusion", export_commands=("diffusers",),
           diffusers_pipelines=("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                                "StableDiffusionInpaintPipeline"),
           export_options=("tensorrt", "deepcache", "controlnet_inputs"), default_model="diffusion",
           text_conditioned=True, latent_vae=True, step_engine=True, playground_tab="tab-txt2img"),
    Family("stable_diffusion_xl", router="services.routers.diffusion",
           pipelines="services.pipelines.pipeline_stable_diffusion_xl:pipelines",
           export="export.stable_diffusion_xl:export_stable_diffusion_xl", export_commands=("diffusers",),
           diffusers_pipelines=("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                                "StableDiffusionXLInpaintPipeline"),
           export_options=("tensorrt", "deepcache", "controlnet_inputs"), default_model="diffusion",
           text_conditioned=True, latent_vae=True, step_engine=True, playground_tab="tab-txt2img"),
    Family("ddpm", router="services.routers.ddpm", pipelines="services.pipelines.pipeline_ddpm:pipelines",
           export="export.ddpm:export_ddpm", export_commands=("ddpm", "diffusers"),
           diffusers_pipelines=("DDPMPipeline", "DDIMPipeline"), diffusers_models=("UNet2DModel",),
           default_model="ddpm", step_engine=True, playground_tab="tab-ddpm"),
    Family("flux", router="services.routers.diffusion", pipelines="services.pipelines.pipeline_flux:pipelines",
           export="export.flux:export_flux", export_commands=("diffusers",),
           diffusers_pipelines=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"),
           export_options=("tensorrt", "max_sequence_length", "native_size"), default_model="diffusion",
           text_conditioned=True, latent_vae=True, step_engine=True, playground_tab="tab-txt2img"),
    Family("vae", router="services.routers.vae", pipelines="services.pipelines.pipeline_vae:vae_pipelines",
           export="export.vae:export_vae", export_commands=("vae", "diffusers"), diffusers_models=("AutoencoderKL",),
           default_model="vae", latent_vae=True, playground_tab="tab-vae"),
    Family("image_to_image", router="services.routers.image_to_image",
           pipelines="services.pipelines:image_to_image_pipelines", pipelines_take_settings=True,
           export="export.super_resolution:export_image_graph", export_commands=("sr", "translator"),
           single_pass=True, playground_tab="tab-upscale"),
)
BY_NAME = {family.name: family for family in FAMILIES}


def names(**capabilities) -> tuple[str, ...]:
    """The names of the families with these capabilities, e.g. names(text_conditioned=True)."""
    return tuple(f.name for f in FAMILIES if all(getattr(f, k) == v for k, v in capabilities.items()))


def routers() -> tuple[str, ...]:
    """Each family router's module, once, in FAMILIES' order (the order of GET /v1/models)."""
    return tuple(dict.fromkeys(f.router for f in FAMILIES))


def default_models() -> tuple[str, ...]:
    """The GENSERVE_DEFAULT_<X>_MODEL groups, in FAMILIES' order."""
    return tuple(dict.fromkeys(f.default_model for f in FAMILIES if f.default_model))
