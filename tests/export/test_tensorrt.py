"""TensorRT profiles, precision, cache keys and configs: all computable without a GPU."""

import shutil
from dataclasses import replace

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.__main__ import main
from export.tensorrt import (
    engine_cache_key,
    gan_profile,
    graph_sha256,
    precision_for,
    stable_diffusion_profile,
    tensorrt_config,
)
from export.triton_config import (
    DeploymentTarget,
    ModelConfigSpec,
    TensorSpec,
    build_model_config,
    config_to_text,
    default_batching,
)

SD = dict(max_rows=16, seq_len=16, hidden=64, latent_channels=4, image_channels=1, vae_scale=4,
          native_latent=8, min_latent=2, max_latent=16)


def test_unet_profile_covers_guidance_doubling_and_sizes():
    p = stable_diffusion_profile("unet", **SD)
    assert p["sample"].min == (1, 4, 2, 2)  # one unguided image at the smallest size
    assert p["sample"].opt == (2, 4, 8, 8)  # one guided image (cond + uncond) at the native size
    assert p["sample"].max == (16, 4, 16, 16)
    assert p["timestep"].max == (16,) and p["encoder_hidden_states"].opt == (2, 16, 64)


def test_a_non_square_native_size_shapes_the_optimum_and_the_maximum():
    wide = {**SD, "native_latent": (8, 12), "max_latent": (16, 24)}
    p = stable_diffusion_profile("unet", **wide)
    assert (p["sample"].opt, p["sample"].max) == ((2, 4, 8, 12), (16, 4, 16, 24))
    assert stable_diffusion_profile("vae_encoder", **wide)["sample"].opt == (1, 1, 32, 48)


def test_vae_profiles_count_images_not_rows():
    assert stable_diffusion_profile("vae_decoder", **SD)["latent_sample"].max == (8, 4, 16, 16)
    assert stable_diffusion_profile("vae_encoder", **SD)["sample"].max == (8, 1, 64, 64)
    with pytest.raises(ValueError):
        stable_diffusion_profile("safety_checker", **SD)


def test_gan_profile_and_precisions():
    p = gan_profile(64, conditional=True, max_batch=16)
    assert p["z"].min == (1, 64) and p["z"].max == (16, 64) and p["class_label"].opt == (8,)
    assert "class_label" not in gan_profile(64, conditional=False, max_batch=4)
    assert [precision_for(c) for c in ("text_encoder", "unet", "vae_decoder", "vae_encoder")] == \
        ["fp16", "fp16", "fp32", "fp32"]


def test_cache_key_changes_with_every_input():
    p = gan_profile(64, True, 16)
    base = engine_cache_key("abc", "9.0", "10.9", p, "fp16")
    others = [engine_cache_key("abd", "9.0", "10.9", p, "fp16"), engine_cache_key("abc", "8.6", "10.9", p, "fp16"),
              engine_cache_key("abc", "9.0", "10.8", p, "fp16"), engine_cache_key("abc", "9.0", "10.9", p, "fp32"),
              engine_cache_key("abc", "9.0", "10.9", gan_profile(64, True, 8), "fp16")]
    assert base == engine_cache_key("abc", "9.0", "10.9", dict(p), "fp16")
    assert len({base, *others}) == 6


def test_tensorrt_and_gpu_onnxruntime_configs_parse():
    spec = ModelConfigSpec("unet", [TensorSpec("sample", "float32", (4, -1, -1))],
                           [TensorSpec("noise_pred", "float32", (4, -1, -1))], default_batching(16, 1000))
    plan = text_format.Parse(config_to_text(build_model_config(tensorrt_config(spec, 2))), mc.ModelConfig())
    assert plan.platform == "tensorrt_plan" and not plan.backend
    assert [(g.kind, g.count) for g in plan.instance_group] == [(mc.ModelInstanceGroup.KIND_GPU, 2)]
    assert not plan.optimization.execution_accelerators.gpu_execution_accelerator

    gpu = build_model_config(replace(spec, target=DeploymentTarget("gpu", 1, "fp32")))
    (accelerator,) = gpu.optimization.execution_accelerators.gpu_execution_accelerator
    assert gpu.backend == "onnxruntime" and accelerator.name == "tensorrt"
    assert accelerator.parameters["precision_mode"] == "FP32"
    cpu = build_model_config(spec)
    assert not cpu.optimization.execution_accelerators.gpu_execution_accelerator


def test_a_plan_config_takes_the_profiles_largest_batch():
    """Triton refuses a max_batch_size past the plan's profile; the backends split larger calls."""
    vae = stable_diffusion_profile("vae_decoder", **SD)  # images: half the U-Net's rows
    spec = ModelConfigSpec("vae_decoder", [TensorSpec("latent_sample", "float32", (4, -1, -1))],
                           [TensorSpec("sample", "float32", (1, -1, -1))], default_batching(16, 1000))
    plan = build_model_config(tensorrt_config(spec, 1, vae))
    assert plan.max_batch_size == 8 and list(plan.dynamic_batching.preferred_batch_size) == [4, 8]


def test_the_cache_hash_covers_weights_kept_beside_the_graph(tmp_path):
    """Fine-tunes of one architecture share the graph file when their weights are external data."""
    (tmp_path / "model.onnx").write_bytes(b"graph")
    (tmp_path / "model.onnx_data").write_bytes(b"weights a")
    first = graph_sha256(tmp_path / "model.onnx")
    (tmp_path / "model.onnx_data").write_bytes(b"weights b")
    assert graph_sha256(tmp_path / "model.onnx") != first


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU: the plan would build")
def test_tensorrt_export_without_a_gpu_stops_with_a_clear_message(tmp_path, capsys):
    assert main(["gan", "--checkpoint", "cgan_digits", "--name", "g", "--repository", str(tmp_path), "--tensorrt"]) == 2
    assert "NVIDIA GPU" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing half-written
