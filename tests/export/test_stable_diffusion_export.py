"""Export of an SD-format folder: four verified graphs plus tokenizer and scheduler config."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.core import EXTERNAL_DATA_FILE, save_with_external_data_if_large
from services.runtime.repository import ModelRepository

pytestmark = pytest.mark.slow


def test_five_graphs_with_their_pipeline_files(random_sd):
    _, repo = random_sd
    models = ModelRepository(repo).models
    assert set(models) == {f"sd_random_{c}" for c in
                           ("text_encoder", "unet", "unet_shallow", "vae_decoder", "vae_encoder")}
    unet = models["sd_random_unet"]
    # ControlNet's residuals: conv_in's, each down block's resnets and downsamplers, the mid block's
    residuals = [f"down_block_res_{i}" for i in range(6)] + ["mid_block_res"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep", "encoder_hidden_states", *residuals]
    assert unet.parameters["genserve.controlnet_residuals"] == "16/1,16/1,16/2,32/2,32/4,32/4,32/4"
    assert [t.name for t in unet.outputs] == ["noise_pred", "deep_features"]  # DeepCache's
    assert unet.inputs[0].dims == (4, -1, -1) and unet.input("timestep").reshape == ()
    assert unet.parameters["genserve.size_multiple"] == "8"  # VAE factor 2 x two U-Net halvings
    te = models["sd_random_text_encoder"]
    assert te.parameters["genserve.max_length"] == "12"
    assert (te.model_dir / "tokenizer.json").exists()
    config = json.loads((unet.model_dir / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    dec = models["sd_random_vae_decoder"]
    assert dec.parameters["genserve.scaling_factor"] == "0.5" and dec.parameters["genserve.image_channels"] == "3"


def test_unet_graph_takes_per_sample_timesteps_and_other_sizes(random_sd):
    from diffusers import UNet2DConditionModel

    folder, repo = random_sd
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    session = ort.InferenceSession(str(repo / "sd_random_unet" / "1" / "model.onnx"))
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((3, 4, 16, 8), dtype=np.float32)
    t = np.array([999.0, 500.0, 1.0], np.float32)
    text = rng.standard_normal((3, 12, 48), dtype=np.float32)
    layout = [(16, 1), (16, 1), (16, 2), (32, 2), (32, 4), (32, 4), (32, 4)]
    names = [i.name for i in session.get_inputs()][3:]
    zeros = {n: np.zeros((3, c, 16 // f, 8 // f), np.float32) for n, (c, f) in zip(names, layout)}
    got = session.run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": text, **zeros})[0]
    with torch.no_grad():
        want = unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(text)).sample.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)  # zero residuals: the U-Net without control
    residuals = {n: rng.standard_normal(z.shape, dtype=np.float32) for n, z in zeros.items()}
    got = session.run(None, {"sample": sample, "timestep": t, "encoder_hidden_states": text, **residuals})[0]
    given = [torch.from_numpy(residuals[n]) for n in names]
    with torch.no_grad():
        want = unet(torch.from_numpy(sample), torch.from_numpy(t), torch.from_numpy(text),
                    down_block_additional_residuals=tuple(given[:-1]), mid_block_additional_residual=given[-1]).sample
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)


def test_large_graphs_move_weights_to_external_data(random_sd, tmp_path):
    _, repo = random_sd
    path = tmp_path / "model.onnx"
    path.write_bytes((repo / "sd_random_vae_decoder" / "1" / "model.onnx").read_bytes())
    assert not save_with_external_data_if_large(path, threshold=path.stat().st_size + 1)
    size = path.stat().st_size
    assert save_with_external_data_if_large(path, threshold=1024)
    assert (tmp_path / EXTERNAL_DATA_FILE).exists() and path.stat().st_size < size / 2
    x = np.zeros((1, 4, 8, 8), np.float32)
    original = ort.InferenceSession(str(repo / "sd_random_vae_decoder" / "1" / "model.onnx"))
    np.testing.assert_array_equal(ort.InferenceSession(str(path)).run(None, {"latent_sample": x})[0],
                                  original.run(None, {"latent_sample": x})[0])


def test_the_unet_is_batched_by_the_engine_so_triton_does_not_wait_for_rows(random_sd):
    """The step engine already sends one call per iteration with every request's rows; Triton
    still merges what queues while busy (delay 0), but never holds a call back for more."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    _, repo = random_sd
    unet, text = (text_format.Parse((repo / m / "config.pbtxt").read_text(), mc.ModelConfig())
                  for m in ("sd_random_unet", "sd_random_text_encoder"))
    assert unet.HasField("dynamic_batching") and unet.dynamic_batching.max_queue_delay_microseconds == 0
    assert text.dynamic_batching.max_queue_delay_microseconds == 1000
