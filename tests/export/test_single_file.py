"""Single-file SD / SDXL checkpoints (export/single_file.py): a random diffusers folder written
as one LDM-layout file (tests/fixtures/ldm_checkpoint.py) converts back to the same weights,
exports and serves the same images as the folder it came from; the architecture is detected as
diffusers detects it; the shipped configurations are the real architectures, offline."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch

from export.__main__ import main
from export.single_file import CONFIGS, SingleFileError, _complete_tokenizers, convert_to_folder, detect_config
from services.pipelines.diffusion import DiffusionRequest
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.ldm_checkpoint import write_ldm_checkpoint


def _weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def _serve(repo, family: str, name: str, **request):
    backend = OnnxRuntimeBackend(ModelRepository(repo))
    if family == "sd":
        from services.pipelines.pipeline_stable_diffusion import pipelines
    else:
        from services.pipelines.pipeline_stable_diffusion_xl import pipelines
    return asyncio.run(pipelines(backend)[name](DiffusionRequest(**request))).images


LAYOUTS = {
    "sd": lambda dest: __import__("tests.fixtures.sd_folder", fromlist=["x"]).build_random_sd_folder(dest),
    "sdxl": lambda dest: __import__("tests.fixtures.sdxl_folder", fromlist=["x"]).build_random_sdxl_folder(dest),
    "sdxl_refiner": lambda dest: __import__("tests.fixtures.sdxl_folder", fromlist=["x"]).build_random_sdxl_folder(
        dest, text_encoder=False, requires_aesthetics_score=True),
}


@pytest.mark.parametrize("layout", [*sorted(LAYOUTS), "sd2"])
def test_a_single_file_converts_back_to_the_folder_it_came_from(tmp_path, layout):
    folder = LAYOUTS["sd" if layout == "sd2" else layout](tmp_path / "folder")
    checkpoint = write_ldm_checkpoint(folder, tmp_path / "model.ckpt", fmt="ckpt", global_step=1000,
                                      open_clip_text=layout == "sd2")  # SD 2.x: OpenCLIP's text layout
    out = convert_to_folder(checkpoint, tmp_path / "converted", config=folder, progress=lambda _: None)
    components = [p.name for p in folder.iterdir() if p.name in ("unet", "vae", "text_encoder", "text_encoder_2")]
    assert len(components) >= 3
    for component in components:
        want, got = _weights(folder / component), _weights(out / component)
        assert want.keys() == got.keys(), component
        for key in want:
            assert torch.equal(want[key], got[key].reshape(want[key].shape)), (component, key)
    assert json.loads((out / "model_index.json").read_text()) == json.loads((folder / "model_index.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("layout,family", [("sd", "sd"), ("sdxl", "sdxl")])
def test_a_single_file_exports_and_serves_as_its_folder(tmp_path, layout, family):
    folder = LAYOUTS[layout](tmp_path / "folder")
    checkpoint = write_ldm_checkpoint(folder, tmp_path / "model.safetensors")
    common = ["--name", "m", "--no-deepcache"]
    assert main(["sd", "--folder", str(folder), "--repository", str(tmp_path / "from_folder"), *common]) == 0
    assert main(["sd", "--checkpoint", str(checkpoint), "--config", str(folder),
                 "--repository", str(tmp_path / "from_file"), *common]) == 0
    a, b = ModelRepository(tmp_path / "from_folder").models, ModelRepository(tmp_path / "from_file").models
    assert a.keys() == b.keys()
    for model in a:
        assert a[model].parameters == b[model].parameters, model
    request = dict(prompt="a photo of a red cat", num_images=2, num_inference_steps=4, guidance_scale=4.0, seed=5)
    np.testing.assert_array_equal(_serve(tmp_path / "from_file", family, "m", **request),
                                  _serve(tmp_path / "from_folder", family, "m", **request))


# --- detection and the shipped configurations ---------------------------------------------------


def _marker_state(**shapes) -> dict:
    """Just the keys (and shapes) diffusers' detection looks at, plus each layout's text keys."""
    return {k: torch.zeros(shape) for k, shape in shapes.items()}


UNET = "model.diffusion_model."


@pytest.mark.parametrize("state,step,config", [
    ({f"{UNET}output_blocks.11.0.skip_connection.weight": (1,),
      "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 1)}, None, "sd15"),
    ({f"{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024),
      "cond_stage_model.model.token_embedding.weight": (1, 1)}, 110000, "sd21"),
    ({f"{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (1, 1024),
      "cond_stage_model.model.token_embedding.weight": (1, 1)}, 875000, "sd21-base"),
    ({"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)}, None, "sdxl-base"),
    ({"conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1,)}, None, "sdxl-refiner"),
])
def test_the_architecture_is_detected_from_keys_and_shapes_as_diffusers_does(state, step, config):
    assert detect_config(_marker_state(**state), step) == config


def test_architectures_not_served_are_refused_by_name():
    inpainting = _marker_state(**{f"{UNET}input_blocks.0.0.weight": (1, 9, 1, 1)})
    with pytest.raises(SingleFileError, match=r"'inpainting' model.*--config FOLDER"):
        detect_config(inpainting)
    sdxl_unet_with_sd_text = _marker_state(**{f"{UNET}output_blocks.11.0.skip_connection.weight": (1,),
                                              "conditioner.embedders.0.transformer.x": (1,)})
    with pytest.raises(SingleFileError, match=r"looks like sd15.*no cond_stage_model.transformer"):
        detect_config(sdxl_unet_with_sd_text)


def test_files_that_are_not_single_file_pipelines_are_refused(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    save_file({f"{UNET}out.2.weight": torch.zeros(1)}, str(tmp_path / "no_vae.safetensors"))
    for name, message in (("unet.safetensors", "holds no model.diffusion_model.* keys"),
                          ("no_vae.safetensors", "embeds no VAE (first_stage_model. or vae.* keys)")):
        assert main(["sd", "--checkpoint", str(tmp_path / name), "--name", "x",
                     "--repository", str(tmp_path / "repo")]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sd", "--folder", str(tmp_path), "--config", "sd15", "--name", "x"])
    assert "--config goes with --checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.iterdir()))
def test_shipped_configurations_are_the_published_architectures(name, tmp_path):
    """Parameter counts of the released models, built on the meta device from the shipped
    configs; tokenizers complete offline with CLIP's own ids."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    import export.torchvision_compat  # noqa: F401

    expected = {"sd15": (859_520_964, {"text_encoder": 123_060_480}),
                "sd21": (865_910_724, {"text_encoder": 340_387_840}),
                "sd21-base": (865_910_724, {"text_encoder": 340_387_840}),
                "sdxl-base": (2_567_463_684, {"text_encoder": 123_060_480, "text_encoder_2": 694_659_840}),
                "sdxl-refiner": (2_259_526_660, {"text_encoder_2": 694_659_840})}[name]
    folder = CONFIGS / name

    def count(model):
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        assert count(UNet2DConditionModel.from_config(json.loads((folder / "unet/config.json").read_text()))) == \
            expected[0]
        assert count(AutoencoderKL.from_config(json.loads((folder / "vae/config.json").read_text()))) == 83_653_863
        for encoder, size in expected[1].items():
            cls = CLIPTextModelWithProjection if encoder.endswith("_2") else CLIPTextModel
            assert count(cls(CLIPTextConfig.from_pretrained(folder / encoder))) == size, encoder
    copy = tmp_path / name
    shutil.copytree(folder, copy)
    _complete_tokenizers(copy)
    for tokenizer in copy.glob("tokenizer*"):
        ids = AutoTokenizer.from_pretrained(tokenizer)("a photo of a cat").input_ids
        assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]  # CLIP ViT-L/14's ids for this prompt
