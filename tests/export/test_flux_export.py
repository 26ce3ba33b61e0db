"""Export of FLUX-format folders: the detecting command picks the family, five verified graphs
whose configs state export/flux.py's contract, external data past a size threshold (the path
a real T5-XXL and 12B transformer take, tested here with a low threshold), options refused for
other families, and the TensorRT profiles the export would build on a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.core import EXTERNAL_DATA_FILE
from export.diffusers_folder import UnsupportedFolder, export_folder
from tests.fixtures.sd_folder import build_random_sd_folder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def config(repo: Path, model: str) -> mc.ModelConfig:
    return text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())


def test_the_detecting_command_writes_five_graphs_with_the_contract(flux_export):
    """The folder (text encoders in bf16) as `python -m export sd` wrote it (tests/conftest.py)."""
    _, repo = flux_export
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "fx_text_encoder", "fx_text_encoder_2", "fx_transformer", "fx_vae_decoder", "fx_vae_encoder"]
    t = config(repo, "fx_transformer")
    assert not t.HasField("dynamic_batching")  # rows of one call share position ids: the engine batches
    assert config(repo, "fx_vae_decoder").HasField("dynamic_batching")
    params = {k: v.string_value for k, v in t.parameters.items()}
    assert params["genserve.pipeline"] == "flux" and params["genserve.guidance_embeds"] == "1"
    assert (params["genserve.native_height"], params["genserve.size_multiple"]) == ("24", "4")
    assert {i.name: list(i.dims) for i in t.input} == {
        "hidden_states": [-1, 16], "img_ids": [-1, 3], "txt_ids": [16, 3], "timestep": [1], "guidance": [1],
        "encoder_hidden_states": [16, 24], "pooled_projections": [32]}
    t5 = config(repo, "fx_text_encoder_2")
    for encoder in ("fx_text_encoder", "fx_text_encoder_2"):  # fp32 graphs from bf16 weights
        session = ort.InferenceSession(str(repo / encoder / "1" / "model.onnx"))
        assert [o.type for o in session.get_outputs()] == ["tensor(float)"]
    assert {k: v.string_value for k, v in t5.parameters.items()}["genserve.max_length"] == "16"
    assert (repo / "fx_text_encoder_2" / "tokenizer.json").exists()
    assert (repo / "fx_transformer" / "scheduler_config.json").exists()
    dec = {k: v.string_value for k, v in config(repo, "fx_vae_decoder").parameters.items()}
    assert float(dec["genserve.shift_factor"]) == pytest.approx(0.1159)


def test_the_transformer_takes_other_sizes_and_batches(flux_export):
    """The dynamic patch axis: a graph traced at one size runs at others and at batch 1."""
    _, repo = flux_export
    session = ort.InferenceSession(str(repo / "fx_transformer" / "1" / "model.onnx"))
    from services.pipelines.pipeline_flux import image_ids

    for b, ph, pw in ((1, 3, 5), (4, 6, 2)):
        feeds = {"hidden_states": np.zeros((b, ph * pw, 16), np.float32), "img_ids": image_ids(b, ph, pw),
                 "txt_ids": np.zeros((b, 16, 3), np.float32), "timestep": np.full(b, 0.5, np.float32),
                 "guidance": np.full(b, 3.5, np.float32), "encoder_hidden_states": np.zeros((b, 16, 24), np.float32),
                 "pooled_projections": np.zeros((b, 32), np.float32)}
        assert session.run(None, feeds)[0].shape == (b, ph * pw, 16)


def test_graphs_past_the_threshold_keep_their_weights_beside_them_and_still_serve(flux_export, tmp_path):
    import asyncio

    from services.pipelines.diffusion import DiffusionRequest
    from services.pipelines.pipeline_flux import pipelines
    from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
    from services.runtime.repository import ModelRepository

    folder, repo = flux_export
    from export.flux import export_flux

    reports = export_flux(folder, tmp_path, "fx", progress=lambda _: None, max_sequence_length=16, native_size=24,
                          external_data_threshold=64 * 1024)
    big = {r.name for r in reports if r.external_data}
    assert {"fx_transformer", "fx_text_encoder_2"} <= big
    for name in big:  # the weights moved out: the graph file shrank by what the data file holds
        graph, whole = tmp_path / name / "1" / "model.onnx", repo / name / "1" / "model.onnx"
        assert (graph.parent / EXTERNAL_DATA_FILE).stat().st_size > 0
        assert graph.stat().st_size < whole.stat().st_size
        # one data file, under the name Triton configs and docs state (torch.export's own
        # `model.onnx.data` for the transformer gathered into it)
        assert sorted(p.name for p in graph.parent.iterdir()) == ["model.onnx", EXTERNAL_DATA_FILE]

    def images(repository):
        pipeline = pipelines(OnnxRuntimeBackend(ModelRepository(repository)))["fx"]
        req = DiffusionRequest(prompt="a small digit", num_inference_steps=2, guidance_scale=3.5,
                               scheduler="flow_match_euler", height=24, width=24, seed=3)
        return asyncio.run(pipeline(req)).images

    np.testing.assert_allclose(images(tmp_path), images(repo), atol=1e-5)


def test_a_flux_folder_missing_components_is_refused_by_name(tmp_path):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    (tmp_path / "vae").mkdir()
    run = subprocess.run([sys.executable, "-m", "export", "sd", "--folder", str(tmp_path), "--name", "x",
                          "--repository", str(tmp_path / "repo")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 2 and "needs the subfolders text_encoder, text_encoder_2" in run.stderr


def test_flux_options_are_refused_for_other_families(tmp_path):
    folder = build_random_sd_folder(tmp_path / "sd")
    with pytest.raises(UnsupportedFolder, match="--max-sequence-length applies to FLUX folders"):
        export_folder(folder, tmp_path / "repo", "sd", max_sequence_length=77, progress=lambda _: None)


def test_tensorrt_profiles_cover_every_size_the_api_accepts_and_one_image_per_row():
    from export.tensorrt import FLUX_PRECISION, flux_profile

    p = flux_profile("transformer", 4, length=512, hidden=4096, pooled=768, channels=64, native=64, guided=True)
    assert p["hidden_states"].min == (1, 1, 64) and p["hidden_states"].opt == (1, 64**2, 64)
    assert p["hidden_states"].max == (4, 128**2, 64) and p["img_ids"].max == (4, 128**2, 3)
    assert p["encoder_hidden_states"].max == (4, 512, 4096) and p["guidance"].max == (4,)
    assert "guidance" not in flux_profile("transformer", 4, length=256, hidden=4096, pooled=768, channels=64,
                                          native=64)
    decoder = flux_profile("vae_decoder", 4, channels=16, native=128)["latent_sample"]
    assert decoder.min == (1, 16, 2, 2) and decoder.max == (4, 16, 256, 256)
    assert flux_profile("vae_encoder", 4, channels=3, native=1024, smallest=16)["sample"].min == (1, 3, 16, 16)
    assert FLUX_PRECISION == {"transformer": "bf16", "text_encoder_2": "bf16"}


# FLUX.1's own text length: its T5 tokenizer's model_max_length is 512, the exporter's default.
# The export once grew past 23 GB for a model of a few MB: its checks ran at batch 3 and twice
# the native size, 4 heads x (16,384 patches + 512 tokens)^2 in fp32 per row. Now the checks are
# sized from activation memory (export/verification.py) and the whole export stays under this.
FLUX_512_RSS_BOUND = 2.5 * 2**30


def test_a_flux_folder_with_512_token_prompts_exports_within_a_memory_bound(tmp_path):
    import json
    import time

    import psutil

    from tests.fixtures.flux_folder import build_random_flux_folder

    folder = build_random_flux_folder(tmp_path / "flux512", num_layers=1, num_single_layers=2,
                                      num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 2, 4),
                                      t5_hidden=40, t5_max_length=512)
    repo = tmp_path / "repo"
    # 128-pixel images (64 latents, 1,024 patches) keep it quick for CI; the 512 tokens are FLUX's.
    # A 1 GiB activation budget for the checks (the default, half the available memory, depends on
    # the machine): twice the native size at batch 3 would need ~2 GiB, so batch 1 native runs.
    proc = subprocess.Popen([sys.executable, "-m", "export", "sd", "--folder", str(folder), "--name", "f512",
                             "--repository", str(repo), "--native-size", "128", "--verify-memory", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, watched = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if peak > 2 * FLUX_512_RSS_BOUND:  # never let a regression take the machine down
            proc.kill()
        time.sleep(0.2)
    output = proc.stdout.read()
    assert proc.returncode == 0, output[-3000:]
    assert peak <= FLUX_512_RSS_BOUND, f"peak RSS {peak / 2**30:.2f} GiB"
    assert config(repo, "f512_text_encoder_2").parameters["genserve.max_length"].string_value == "512"
    report = {c["component"]: c for c in json.loads((repo / "export_report.json").read_text())["f512"]["components"]}
    transformer = report["f512_transformer"]["verified"]
    # Dynamic axes at a small non-square grid, then the served size (64 x 64 latents).
    assert "batch 3 at grid 4x6 (dynamic axes" in transformer and "batch 1 at grid 64x64 (served size" in transformer
