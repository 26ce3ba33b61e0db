"""The genserve.* contract: every role round-trips, the demo repository is written through it,
and a config it cannot read is refused with the model and the exporter to rerun, never misread."""

import shutil

import pytest
from google.protobuf import text_format

from services.contract import (
    CONTRACT_VERSION,
    VERSION_KEY,
    ContractError,
    ControlNetFacts,
    GeneratorFacts,
    ImageToImageFacts,
    Role,
    StyleGANFacts,
    TextEncoderFacts,
    TransformerFacts,
    UNetFacts,
    VAEFacts,
)
from services.runtime.repository import ModelRepository, RepositoryError, parse_model_config

# Each role with its optional facts unset and set.
EXAMPLES = {
    "text_encoder": TextEncoderFacts(max_length=77, pad_token_id=49407),
    "text_encoder_sdxl": TextEncoderFacts(max_length=77, pad_token_id=0, hidden_size=1280, bos_token_id=49406,
                                          eos_token_id=49407, pooled=True, pooled_dim=1280),
    "text_encoder_flux_clip": TextEncoderFacts(max_length=77, pad_token_id=49407, pooled_dim=768, truncate=True),
    "unet_sd": UNetFacts(in_channels=4, size_multiple=64, native_height=512, native_width=512, vae_scale_factor=8,
                         controlnet_residuals="32/1,32/1,64/2,64/2"),
    "unet_sdxl_shallow": UNetFacts(in_channels=4, size_multiple=32, native_height=1024, native_width=768,
                                   vae_scale_factor=8, num_time_ids=6, text_embeds_dim=1280, cross_attention_dim=2048,
                                   force_zeros_for_empty_prompt=True, requires_aesthetics_score=False,
                                   deep_channels=320),
    "unet_ddpm": UNetFacts(in_channels=1, out_channels=1, size_multiple=4, native_height=32, native_width=24,
                           num_classes=10, output_range=(-1.0, 1.0)),
    "transformer": TransformerFacts(in_channels=64, guidance_embeds=False, native_height=1024, native_width=1024,
                                    vae_scale_factor=8, size_multiple=16),
    "vae_pipeline": VAEFacts(vae_scale_factor=8, scaling_factor=0.18215, image_channels=3, latent_channels=4),
    "vae_standalone": VAEFacts(vae_scale_factor=4, scaling_factor=0.5, image_channels=3, latent_channels=4,
                               shift_factor=0.0625, size_multiple=4, native_height=32, native_width=48),
    "vae_sdxl": VAEFacts(vae_scale_factor=8, scaling_factor=0.13025, image_channels=3, latent_channels=4,
                         latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.0, 0.5, 2.0, 1.5)),
    "controlnet": ControlNetFacts(name="outline", controlnet_residuals="32/1,64/2", vae_scale_factor=2),
    "controlnet_global_pool": ControlNetFacts(name="shuffle", conditioning_channels=1, global_pool_conditions=True),
    "gan_vector": GeneratorFacts((64,), 10, 1, 32, 32),
    "gan_map": GeneratorFacts((100, 1, 1), 0, 3, 64, 48, (0.0, 1.0)),
    "stylegan": StyleGANFacts(512, 0, 512, 18, 3, 1024, 1024),
    "image_to_image": ImageToImageFacts(input_channels=3, output_channels=3, scale=4, size_multiple=4,
                                        tile=192, architecture="ESRGAN", license="BSD-3-Clause"),
    "translator": ImageToImageFacts(input_channels=1, output_channels=3, task="translation",
                                    input_range=(-1.0, 1.0), output_range=(-1.0, 1.0), size_minimum=16),
}


def _role(params: dict) -> type[Role]:
    """The role a config of the demo repository plays."""
    pipeline, component = params["genserve.pipeline"], params.get("genserve.component", "")
    if "genserve.controlnet" in params:
        return ControlNetFacts
    by_pipeline = {"gan": GeneratorFacts, "stylegan": StyleGANFacts, "image_to_image": ImageToImageFacts}
    if pipeline in by_pipeline:
        return by_pipeline[pipeline]
    if component.startswith("text_encoder"):
        return TextEncoderFacts
    return {"unet": UNetFacts, "unet_shallow": UNetFacts, "transformer": TransformerFacts}.get(component, VAEFacts)


def test_every_role_has_an_example():
    assert {type(facts) for facts in EXAMPLES.values()} == {
        TextEncoderFacts, UNetFacts, TransformerFacts, VAEFacts, ControlNetFacts, GeneratorFacts, StyleGANFacts,
        ImageToImageFacts}


@pytest.mark.parametrize("example", EXAMPLES)
def test_round_trip(example):
    facts = EXAMPLES[example]
    params = facts.to_parameters()
    assert all(k.startswith("genserve.") and isinstance(v, str) for k, v in params.items())
    assert type(facts).from_parameters(params, "m") == facts


def test_the_demo_repository_parses_fully_and_carries_the_version(repository):
    for config_path in sorted(repository.glob("*/config.pbtxt")):
        config = parse_model_config(config_path.read_text())
        assert config.parameters[VERSION_KEY].string_value == str(CONTRACT_VERSION), config_path
    models = ModelRepository(repository).models
    assert models
    for name, spec in models.items():
        assert spec.contract_version == CONTRACT_VERSION and VERSION_KEY not in spec.parameters
        facts = _role(spec.parameters).from_spec(spec)
        # what the exporter wrote is what the contract writes for these facts
        assert facts.to_parameters().items() <= spec.parameters.items(), name


def _repository_with(repository, tmp_path, model: str, edit) -> ModelRepository:
    shutil.copytree(repository / model, tmp_path / model)
    config = tmp_path / model / "config.pbtxt"
    parsed = parse_model_config(config.read_text())
    edit(parsed.parameters)
    config.write_text(text_format.MessageToString(parsed))
    return ModelRepository(tmp_path)


def test_a_config_without_the_version_loads_as_version_1(repository, tmp_path):
    def edit(p):
        del p[VERSION_KEY]

    old = _repository_with(repository, tmp_path, "sd_digits_unet", edit)
    spec, today = old["sd_digits_unet"], ModelRepository(repository)["sd_digits_unet"]
    assert spec.contract_version == 1 and spec.parameters == today.parameters
    assert UNetFacts.from_spec(spec) == UNetFacts.from_spec(today)


@pytest.mark.parametrize("version", [str(CONTRACT_VERSION + 1), "1.5", "two"])
def test_a_newer_or_unreadable_version_is_refused_naming_the_model_and_exporter(repository, tmp_path, version):
    def edit(p):
        p[VERSION_KEY].string_value = version

    with pytest.raises(RepositoryError, match=r"model 'sd_digits_unet'.*contract version.*"
                                              r"`python -m export diffusers --folder FOLDER --name sd_digits`"):
        _repository_with(repository, tmp_path, "sd_digits_unet", edit)


def test_a_missing_key_is_refused_naming_the_model_and_exporter(repository):
    params = dict(ModelRepository(repository)["stylegan_digits_mapping"].parameters)
    del params["genserve.w_dim"]
    with pytest.raises(ContractError, match=r"model 'stylegan_digits_mapping': its config lacks genserve.w_dim; export "
                                            r"it again with `python -m export stylegan .*--name stylegan_digits`"):
        StyleGANFacts.from_parameters(params, "stylegan_digits_mapping")


@pytest.mark.parametrize("key, value", [("genserve.in_channels", "four"), ("genserve.size_multiple", "8.5"),
                                        ("genserve.output_range", "-1"), ("genserve.sample_height", "x")])
def test_a_bad_type_is_refused_naming_the_model_and_exporter(repository, key, value):
    params = dict(ModelRepository(repository)["ddpm_digits_unet"].parameters) | {key: value}
    with pytest.raises(ContractError, match=r"model 'ddpm_digits_unet': genserve\.\w+ is .*, not .*"
                                            r"`python -m export ddpm --folder FOLDER --name ddpm_digits`"):
        UNetFacts.from_parameters(params, "ddpm_digits_unet")


def test_a_newer_version_is_refused_by_the_dataclasses_too():
    params = EXAMPLES["gan_vector"].to_parameters() | {"genserve.pipeline": "gan",
                                                       VERSION_KEY: str(CONTRACT_VERSION + 1)}
    with pytest.raises(ContractError, match=r"model 'g'.*`python -m export gan --checkpoint CHECKPOINT --name g`"):
        GeneratorFacts.from_parameters(params, "g")


def test_older_spellings_of_the_native_size_still_read():
    # U-Nets exported before non-square sizes: sample_size alone, in latent cells
    unet = UNetFacts.from_parameters({"genserve.in_channels": "4", "genserve.sample_size": "64",
                                      "genserve.vae_scale_factor": "8", "genserve.size_multiple": "64"}, "u")
    assert (unet.native_height, unet.native_width) == (512, 512)
    # generators before image_height/width and latent_shape: image_size and latent_dim alone
    gan = GeneratorFacts.from_parameters({"genserve.latent_dim": "8", "genserve.image_channels": "1",
                                          "genserve.image_size": "4"}, "g")
    assert gan == GeneratorFacts((8,), 0, 1, 4, 4)
    vae = VAEFacts.from_parameters({"genserve.vae_scale_factor": "2", "genserve.scaling_factor": "0.5",
                                    "genserve.image_channels": "3", "genserve.latent_channels": "4",
                                    "genserve.sample_size": "16"}, "v")
    assert (vae.native_height, vae.native_width) == (16, 16)
