"""Export of SDXL-format folders: five verified graphs (four for refiner-style folders),
tokenizers and scheduler config, configs that state the contract in
export/stable_diffusion_xl.py's docstring, and parity with diffusers' own pipeline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from services.pipelines.controlnet import parse_layout
from tests.fixtures.sdxl_folder import MAX_LENGTH, PROMPTS, build_random_sdxl_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

# name -> fixture variant; "base" is exported through the command line.
VARIANTS = {
    "base": {},
    # three levels, other widths, a non-square native size, a VAE with shift and latent
    # statistics that diffusers need not upcast, DDIM, no zeroed empty prompt
    "wide": dict(levels=3, block_out_channels=(16, 24, 32), hidden_size=24, hidden_size_2=40, projection_dim=16,
                 addition_time_embed_dim=4, sample_size=(8, 12), force_upcast=False, shift_factor=0.1,
                 latents_mean_std=True, scheduler="ddim", force_zeros_for_empty_prompt=False),
    # stable-diffusion-xl-refiner-1.0's shape: text_encoder_2 only, aesthetic score, and its
    # config's legacy eos_token_id=2 (pooled at the largest id)
    "refiner": dict(text_encoder=False, requires_aesthetics_score=True, force_zeros_for_empty_prompt=None,
                    legacy_eos_token_id=True),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (folder, repository) for each variant."""
    from export.stable_diffusion_xl import export_stable_diffusion_xl

    out = {}
    for name, variant in VARIANTS.items():
        folder = build_random_sdxl_folder(tmp_path_factory.mktemp(f"sdxl_{name}"), seed=1, **variant)
        repo = tmp_path_factory.mktemp(f"sdxl_{name}_repository")
        if name == "base":
            run = subprocess.run(
                [sys.executable, "-m", "export", "diffusers", "--folder", str(folder), "--name", name,
                 "--repository", str(repo)], cwd=ROOT, capture_output=True, text=True, timeout=600)
            assert run.returncode == 0, run.stderr[-3000:]
            assert "base: stable_diffusion_xl, 6 graphs verified" in run.stdout
        else:
            reports = export_stable_diffusion_xl(folder, repo, name, progress=lambda _: None)
            assert all(r.max_abs_error < 1e-3 for r in reports)
        out[name] = folder, repo
    return out


def config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def params(cfg: mc.ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in cfg.parameters.items()}


def tensors(items) -> dict[str, tuple[int, tuple[int, ...], tuple[int, ...] | None]]:
    return {t.name: (t.data_type, tuple(t.dims), tuple(t.reshape.shape) if t.HasField("reshape") else None)
            for t in items}


def session(repo: Path, model: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(repo / model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_repository_layout_and_configs(exported):
    folder, repo = exported["base"]
    roles = ["text_encoder", "text_encoder_2", "unet", "unet_shallow", "vae_decoder", "vae_encoder"]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [f"base_{r}" for r in roles]
    for role in roles:
        cfg = config(repo, f"base_{role}")
        assert (repo / f"base_{role}" / "1" / "model.onnx").exists()
        assert cfg.max_batch_size == 16 and cfg.backend == "onnxruntime"
        assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
        p = params(cfg)
        assert (p["genserve.pipeline"], p["genserve.pipeline_name"], p["genserve.component"]) == \
            ("stable_diffusion_xl", "base", role)

    fp32, i64 = mc.TYPE_FP32, mc.TYPE_INT64
    te, te2 = config(repo, "base_text_encoder"), config(repo, "base_text_encoder_2")
    assert tensors(te.input) == tensors(te2.input) == {"input_ids": (i64, (MAX_LENGTH,), None)}
    assert tensors(te.output) == {"hidden_states": (fp32, (MAX_LENGTH, 32), None)}
    assert tensors(te2.output) == {"hidden_states": (fp32, (MAX_LENGTH, 48), None), "pooled": (fp32, (40,), None)}
    p1, p2 = params(te), params(te2)
    assert (p1["genserve.pooled"], p2["genserve.pooled"], p2["genserve.pooled_dim"]) == ("0", "1", "40")
    assert p1["genserve.hidden_size"] == "32" and p2["genserve.hidden_size"] == "48"
    assert p1["genserve.max_length"] == p2["genserve.max_length"] == str(MAX_LENGTH)
    # tokenizer pads with eos, tokenizer_2 with "!" (id 0), as in SDXL
    assert p1["genserve.pad_token_id"] == p1["genserve.eos_token_id"] and p2["genserve.pad_token_id"] == "0"
    assert p1["genserve.bos_token_id"] == p2["genserve.bos_token_id"]
    assert (repo / "base_text_encoder" / "tokenizer.json").exists()
    assert (repo / "base_text_encoder_2" / "tokenizer.json").exists()

    unet = config(repo, "base_unet")
    # ControlNet residual inputs (export.controlnet): one per down-block skip and the mid block's,
    # at the U-Net's channels and resolutions, zero for rows without control.
    residuals = {f"down_block_res_{i}": (fp32, (c, -1, -1), None) for i, c in enumerate((16, 16, 16, 32))}
    assert tensors(unet.input) == {
        "sample": (fp32, (4, -1, -1), None), "timestep": (fp32, (1,), ()),
        "encoder_hidden_states": (fp32, (MAX_LENGTH, 80), None), "text_embeds": (fp32, (40,), None),
        "time_ids": (fp32, (6,), None), **residuals, "mid_block_res": (fp32, (32, -1, -1), None)}
    assert params(unet)["genserve.controlnet_residuals"] == "16/1,16/1,16/2,32/2,32/2"  # channels/downsampling
    shallow = config(repo, "base_unet_shallow")
    deep = int(params(shallow)["genserve.deep_channels"])
    assert tensors(unet.output) == {"noise_pred": (fp32, (4, -1, -1), None),
                                    "deep_features": (fp32, (deep, -1, -1), None)}
    # DeepCache's shallow U-Net: SDXL's shallowest blocks have no cross attention, so no text input.
    assert tensors(shallow.input) == {"sample": (fp32, (4, -1, -1), None), "timestep": (fp32, (1,), ()),
                                      "deep_features": (fp32, (deep, -1, -1), None),
                                      "text_embeds": (fp32, (40,), None), "time_ids": (fp32, (6,), None)}
    assert tensors(shallow.output) == {"noise_pred": (fp32, (4, -1, -1), None)}
    p = params(unet)
    assert {k: p[f"genserve.{k}"] for k in (
        "in_channels", "sample_size", "sample_height", "sample_width", "vae_scale_factor", "size_multiple",
        "num_time_ids", "text_embeds_dim", "cross_attention_dim", "force_zeros_for_empty_prompt",
        "requires_aesthetics_score")} == {
        "in_channels": "4", "sample_size": "8", "sample_height": "8", "sample_width": "8", "vae_scale_factor": "2",
        "size_multiple": "4", "num_time_ids": "6", "text_embeds_dim": "40", "cross_attention_dim": "80",
        "force_zeros_for_empty_prompt": "1", "requires_aesthetics_score": "0"}
    warmup = unet.model_warmup[0].inputs
    assert list(warmup["sample"].dims) == [4, 8, 8] and list(warmup["time_ids"].dims) == [6]
    assert json.loads((repo / "base_unet" / "scheduler_config.json").read_text()) == \
        json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert json.loads((repo / "base_unet" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"

    dec, enc = config(repo, "base_vae_decoder"), config(repo, "base_vae_encoder")
    assert tensors(dec.input) == {"latent_sample": (fp32, (4, -1, -1), None)}
    assert tensors(dec.output) == {"sample": (fp32, (3, -1, -1), None)}
    assert tensors(enc.input) == {"sample": (fp32, (3, -1, -1), None)}
    assert tensors(enc.output) == {"latent_parameters": (fp32, (8, -1, -1), None)}
    for cfg in (dec, enc):
        p = params(cfg)
        assert (p["genserve.scaling_factor"], p["genserve.force_upcast"], p["genserve.latent_channels"]) == \
            ("0.13025", "1", "4")
        assert "genserve.shift_factor" not in p and "genserve.latents_mean" not in p
    assert list(dec.model_warmup[0].inputs["latent_sample"].dims) == [4, 8, 8]


def test_variant_configs_follow_the_folder(exported):
    _, repo = exported["wide"]
    unet = params(config(repo, "wide_unet"))
    assert "genserve.sample_size" not in unet  # non-square: only height and width
    assert (unet["genserve.sample_height"], unet["genserve.sample_width"]) == ("8", "12")
    assert unet["genserve.size_multiple"] == "8"  # VAE factor 2 x two U-Net halvings
    assert (unet["genserve.num_time_ids"], unet["genserve.cross_attention_dim"]) == ("6", "64")
    assert unet["genserve.force_zeros_for_empty_prompt"] == "0"
    assert tensors(config(repo, "wide_unet").input)["text_embeds"][1] == (16,)
    assert list(config(repo, "wide_unet").model_warmup[0].inputs["sample"].dims) == [4, 8, 12]
    vae = params(config(repo, "wide_vae_decoder"))
    assert (vae["genserve.force_upcast"], vae["genserve.shift_factor"]) == ("0", "0.1")
    assert [float(v) for v in vae["genserve.latents_mean"].split(",")] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert [float(v) for v in vae["genserve.latents_std"].split(",")] == [1.0, 1.5, 2.0, 2.5]

    _, repo = exported["refiner"]
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == \
        [f"refiner_{r}" for r in ("text_encoder_2", "unet", "unet_shallow", "vae_decoder", "vae_encoder")]
    unet_cfg = config(repo, "refiner_unet")
    unet = params(unet_cfg)
    assert (unet["genserve.num_time_ids"], unet["genserve.requires_aesthetics_score"]) == ("5", "1")
    assert unet["genserve.force_zeros_for_empty_prompt"] == "1"  # absent from model_index: diffusers' default
    assert tensors(unet_cfg.input)["encoder_hidden_states"][1] == (MAX_LENGTH, 48)
    assert tensors(unet_cfg.input)["time_ids"][1] == (5,)


def _ids(repo: Path, model: str, prompt: str) -> np.ndarray:
    """What the torch-free side does: tokenizer.json without padding, then the config's pad id."""
    from tokenizers import Tokenizer

    p = params(config(repo, model))
    tok = Tokenizer.from_file(str(repo / model / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    ids = tok.encode(prompt).ids
    length = int(p["genserve.max_length"])
    return np.asarray(ids + [int(p["genserve.pad_token_id"])] * (length - len(ids)), np.int64)


@pytest.mark.parametrize("variant", ["base", "refiner"])
def test_text_encoders_match_diffusers_encode_prompt(exported, variant):
    """ONNX text encoders fed with the repository's tokenizers give diffusers' prompt_embeds
    (penultimate hidden states, concatenated) and pooled_prompt_embeds."""
    from diffusers import DiffusionPipeline

    folder, repo = exported[variant]
    pipe = DiffusionPipeline.from_pretrained(folder)
    roles = ["text_encoder", "text_encoder_2"] if variant == "base" else ["text_encoder_2"]
    tokenizers = {"text_encoder": pipe.tokenizer, "text_encoder_2": pipe.tokenizer_2}
    hidden, pooled = [], None
    for role in roles:
        ids = np.stack([_ids(repo, f"{variant}_{role}", p) for p in PROMPTS])
        want_ids = tokenizers[role](PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
        np.testing.assert_array_equal(ids, np.asarray(want_ids))
        outs = dict(zip([o.name for o in session(repo, f"{variant}_{role}").get_outputs()],
                        session(repo, f"{variant}_{role}").run(None, {"input_ids": ids})))
        hidden.append(outs["hidden_states"])
        pooled = outs.get("pooled", pooled)
    with torch.no_grad():
        embeds, _, pooled_embeds, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    np.testing.assert_allclose(np.concatenate(hidden, axis=-1), embeds.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled, pooled_embeds.numpy(), atol=1e-5)


@pytest.mark.parametrize("variant,size", [("base", (6, 10)), ("wide", (16, 8)), ("refiner", (10, 4))])
def test_unet_graph_takes_per_sample_timesteps_and_other_sizes(exported, variant, size):
    from diffusers import UNet2DConditionModel

    folder, repo = exported[variant]
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    cfg = config(repo, f"{variant}_unet")
    dims = {t.name: tuple(t.dims) for t in cfg.input}
    rng = np.random.default_rng(0)
    inputs = {
        "sample": rng.standard_normal((3, 4, *size), dtype=np.float32),
        "timestep": np.array([999.0, 500.0, 1.0], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, *dims["encoder_hidden_states"]), dtype=np.float32),
        "text_embeds": rng.standard_normal((3, *dims["text_embeds"]), dtype=np.float32),
        "time_ids": np.array([[1024, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 0, 1024, 1024],
                              [512, 512, 0, 64, 512, 768]], np.float32)[:, :dims["time_ids"][0]],
    }
    # ControlNet residuals, random so that the check sees the graph add them where diffusers does.
    layout = parse_layout(params(cfg)["genserve.controlnet_residuals"])
    residuals = {n: rng.standard_normal((3, c, size[0] // f, size[1] // f), dtype=np.float32) for n, c, f in layout}
    inputs.update(residuals)
    got = session(repo, f"{variant}_unet").run(None, inputs)[0]
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        want = unet(t["sample"], t["timestep"], t["encoder_hidden_states"],
                    added_cond_kwargs={"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]},
                    down_block_additional_residuals=tuple(t[n] for n, _, _ in layout[:-1]),
                    mid_block_additional_residual=t[layout[-1][0]]).sample.numpy()
    assert got.shape == (3, 4, *size)
    np.testing.assert_allclose(got, want, atol=1e-4)
    # each row is its own request: row 1 alone gives the same as inside the batch
    alone = session(repo, f"{variant}_unet").run(None, {k: v[1:2] for k, v in inputs.items()})[0]
    np.testing.assert_allclose(alone[0], got[1], atol=1e-5)


@pytest.mark.parametrize("variant", ["base", "wide"])
def test_diffusers_loads_the_fixture_and_runs_two_steps(exported, variant):
    from diffusers import StableDiffusionXLPipeline

    folder, _ = exported[variant]
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    h, w = (8, 8) if variant == "base" else (8, 12)
    latents = torch.randn((2, 4, h, w), generator=torch.Generator().manual_seed(0))
    images = pipe(PROMPTS[:2], negative_prompt=["", "blurry"], num_inference_steps=2, guidance_scale=5.0,
                  latents=latents, height=2 * h, width=2 * w, output_type="np").images
    assert images.shape == (2, 2 * h, 2 * w, 3) and np.isfinite(images).all()


def test_other_pipelines_are_refused_by_name(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    run = subprocess.run([sys.executable, "-m", "export", "sd", "--folder", str(tmp_path), "--name", "x",
                          "--repository", str(tmp_path / "repo")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "StableDiffusion3Pipeline" in run.stderr
    assert not (tmp_path / "repo").exists()


def test_tensorrt_is_refused_with_a_reason(tmp_path):
    from export.diffusers_folder import UnsupportedFolder
    from export.stable_diffusion_xl import export_stable_diffusion_xl

    with pytest.raises(UnsupportedFolder, match="TensorRT"):
        export_stable_diffusion_xl(tmp_path, tmp_path / "repo", "x", tensorrt=True)
