"""`--dtype fp16`: graphs in half precision for GPUs, checked on CPU against the fp32 module, with
the fp32 contract at their inputs and outputs; a VAE whose config asks for fp32 stays fp32."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.__main__ import main
from tests.fixtures.vae_folder import build_random_vae_folder

pytestmark = pytest.mark.slow


def _weight_types(path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer if t.dims and np.prod(t.dims) > 1}


def test_fp16_graphs_keep_fp32_inputs_and_outputs_and_match_pytorch(tmp_path, capsys):
    from diffusers import AutoencoderKL

    folder = build_random_vae_folder(tmp_path / "vae", force_upcast=False)  # an fp16-safe VAE (SDXL's fp16 fix)
    repo = tmp_path / "repo"
    assert main(["vae", "--folder", str(folder), "--name", "h", "--repository", str(repo), "--dtype", "fp16"]) == 0
    graph = repo / "h_vae_decoder" / "1" / "model.onnx"
    assert onnx.TensorProto.FLOAT16 in _weight_types(graph) and onnx.TensorProto.FLOAT not in _weight_types(graph)
    config = (repo / "h_vae_decoder" / "config.pbtxt").read_text()
    assert 'key: "genserve.precision"\n  value {\n    string_value: "fp16"' in config
    session = ort.InferenceSession(str(graph))
    assert [i.type for i in session.get_inputs()] == [o.type for o in session.get_outputs()] == ["tensor(float)"]
    latents = np.random.default_rng(0).standard_normal((2, 4, 6, 10), dtype=np.float32)
    got = session.run(None, {"latent_sample": latents})[0]
    with torch.no_grad():
        want = AutoencoderKL.from_pretrained(folder).decode(torch.from_numpy(latents)).sample.numpy()
    assert got.dtype == np.float32 and np.abs(got - want).max() < 3e-2
    assert np.abs(got - want).max() > 0  # half precision, not the fp32 graph
    assert "max abs error" in capsys.readouterr().out


def test_a_vae_that_asks_for_fp32_stays_fp32(tmp_path):
    folder = build_random_vae_folder(tmp_path / "vae", force_upcast=True)  # SD's and SDXL's VAEs overflow in fp16
    repo = tmp_path / "repo"
    assert main(["vae", "--folder", str(folder), "--name", "u", "--repository", str(repo), "--dtype", "fp16"]) == 0
    for role in ("vae_decoder", "vae_encoder"):
        assert _weight_types(repo / f"u_{role}" / "1" / "model.onnx") == {onnx.TensorProto.FLOAT}
        assert 'string_value: "fp32"' in (repo / f"u_{role}" / "config.pbtxt").read_text()
