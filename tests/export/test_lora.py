"""LoRA adapters: files as published -> stored layout -> slotted graphs, against diffusers.

The tiny random SD folder (tests/fixtures/sd_folder.py) gets a PEFT-format LoRA (ranks 4 and 2,
alpha patterns, conv layers, text-encoder layers, the metadata header) and a kohya-format one
(alpha, a 3x3 LoCon conv, every text-encoder projection). The slotted U-Net and text encoder
must give what diffusers gives after `load_lora_weights` + `set_adapters` at the same scale,
and a batch mixing adapters (and none) must give each row what it gets alone.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

pytestmark = pytest.mark.slow
SCALE = 0.7


@pytest.fixture(scope="module")
def lora_setup(random_sd, tmp_path_factory):
    import shutil

    import export.torchvision_compat  # noqa: F401
    from export.lora import add_adapter_slots, export_lora
    from tests.fixtures.lora_files import write_kohya_lora, write_peft_lora

    folder, shared = random_sd
    tmp = tmp_path_factory.mktemp("lora")
    # A copy: with model_lora.onnx beside a graph the embedded backend serves the slotted one, which
    # would change what every later test of the session's repository runs.
    repo = shutil.copytree(shared, tmp / "repo")
    files = {"peft": write_peft_lora(folder, tmp / "peft"),
             "kohya": write_kohya_lora(folder, tmp / "kohya.safetensors", text_model_prefix=False),
             "peft16": write_peft_lora(folder, tmp / "peft16", seed=1, dtype="float16")}
    for name, path in files.items():
        export_lora(path, repo, "sd_random", name, progress=lambda _: None)
    slotted = {role: add_adapter_slots(repo / f"sd_random_{role}" / "1" / "model.onnx")
               for role in ("unet", "text_encoder")}
    return folder, repo, files, slotted


def _session(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, {i.name: i.shape for i in session.get_inputs()}


def _reference_pipe(folder):
    import torch
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)


def _unet_inputs(repo, rows=3):
    """The U-Net's inputs, with zero ControlNet residuals where it was exported with them."""
    from services.pipelines.controlnet import zero_residuals
    from services.runtime.repository import ModelRepository

    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((rows, 4, 8, 8), dtype=np.float32),
            "timestep": np.linspace(10, 900, rows).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal((rows, 12, 48), dtype=np.float32),
            **zero_residuals(ModelRepository(repo).models["sd_random_unet"], rows, 8, 8)}


def _torch_unet(pipe, feed):
    import torch

    with torch.no_grad():
        return pipe.unet(*(torch.from_numpy(feed[k]) for k in ("sample", "timestep", "encoder_hidden_states"))
                         ).sample.numpy()


def _torch_text(pipe, ids):
    import torch

    with torch.no_grad():
        return pipe.text_encoder(torch.from_numpy(ids))[0].numpy()


def _load(pipe, files, weights: dict[str, float]):
    pipe.unload_lora_weights()
    for name in weights:
        pipe.load_lora_weights(str(files[name]), adapter_name=name)
    pipe.set_adapters(list(weights), list(weights.values()))


def test_stored_layout_names_graph_nodes_ranks_and_scaling(lora_setup):
    from safetensors.numpy import load_file

    _, repo, _, _ = lora_setup
    folder = repo / "sd_random_unet" / "adapters" / "peft"
    manifest = json.loads((folder / "adapter.json").read_text())
    assert manifest["pipeline"] == "sd_random" and manifest["format"] == "peft"
    assert set(manifest["graphs"]) == {"sd_random_unet", "sd_random_text_encoder"}
    by_module = {layer["module"]: layer for layer in manifest["layers"]}
    to_k = next(v for k, v in by_module.items() if k.endswith("attn1.to_k"))
    to_v = next(v for k, v in by_module.items() if k.endswith("attn1.to_v"))
    conv = next(v for k, v in by_module.items() if k.endswith("conv1"))
    assert (to_k["rank"], to_k["scale"]) == (2, 4.0)  # rank_pattern: alpha 8 / rank 2
    assert (to_v["rank"], to_v["scale"]) == (4, 0.5)  # alpha_pattern: alpha 2 / rank 4
    assert conv["kind"] == "conv" and conv["kernel"] == [3, 3]
    assert to_k["node"].endswith("/attn1/to_k/MatMul")
    tensors = load_file(str(folder / "weights.safetensors"))
    assert tensors[f"sd_random_unet:{to_k['node']}:down"].shape == (2, to_k["in_features"])
    kohya = json.loads((repo / "sd_random_unet" / "adapters" / "kohya" / "adapter.json").read_text())
    assert kohya["format"] == "kohya" and {layer["scale"] for layer in kohya["layers"]} == {0.5, 2 / 5}
    stored = json.loads((repo / "sd_random_unet" / "adapters" / "peft16" / "adapter.json").read_text())
    assert stored["dtype"] == "float16"


@pytest.mark.parametrize("name", ["peft", "kohya", "peft16"])
def test_slotted_unet_and_text_encoder_match_diffusers(lora_setup, name):
    from services.adapters import load_adapter, slot_inputs

    folder, repo, files, slotted = lora_setup
    pipe = _reference_pipe(folder)
    adapter = load_adapter(repo / "sd_random_unet" / "adapters" / name)
    feed = _unet_inputs(repo)
    plain = _torch_unet(pipe, feed)
    _load(pipe, files, {name: SCALE})
    expected = _torch_unet(pipe, feed)
    session, shapes = _session(slotted["unet"])
    got = session.run(None, {**feed, **slot_inputs("sd_random_unet", shapes, [adapter],
                                                   np.full((3, 1), SCALE, np.float32))})[0]
    assert np.abs(expected - plain).max() > 0.05  # the adapter changes the output
    assert np.abs(got - expected).max() < 1e-4
    ids = np.random.default_rng(1).integers(0, pipe.text_encoder.config.vocab_size, (2, 12)).astype(np.int64)
    te, te_shapes = _session(slotted["text_encoder"])
    got_te = te.run(None, {"input_ids": ids, **slot_inputs("sd_random_text_encoder", te_shapes, [adapter],
                                                            np.full((2, 1), SCALE, np.float32))})[0]
    assert np.abs(got_te - _torch_text(pipe, ids)).max() < 1e-4


def test_batch_of_different_adapter_sets_equals_each_alone(lora_setup):
    """Four rows: peft, none, kohya, peft*0.3+kohya*0.9, in one call."""
    from services.adapters import load_adapter, slot_inputs

    folder, repo, files, slotted = lora_setup
    adapters = [load_adapter(repo / "sd_random_unet" / "adapters" / n) for n in ("peft", "kohya")]
    session, shapes = _session(slotted["unet"])
    feed = _unet_inputs(repo, 4)
    scales = np.array([[SCALE, 0], [0, 0], [0, SCALE], [0.3, 0.9]], np.float32)
    batch = session.run(None, {**feed, **slot_inputs("sd_random_unet", shapes, adapters, scales)})[0]
    pipe = _reference_pipe(folder)
    sets = [{"peft": SCALE}, {}, {"kohya": SCALE}, {"peft": 0.3, "kohya": 0.9}]
    for row, weights in enumerate(sets):
        one = {k: v[row:row + 1] for k, v in feed.items()}
        if weights:
            _load(pipe, files, weights)
        else:
            pipe.unload_lora_weights()
        assert np.abs(batch[row] - _torch_unet(pipe, one)[0]).max() < 1e-4, (row, weights)
    alone = session.run(None, {**{k: v[3:] for k, v in feed.items()},
                               **slot_inputs("sd_random_unet", shapes, adapters, scales[3:])})[0]
    np.testing.assert_allclose(batch[3:], alone, atol=1e-5)


def test_call_without_adapters_takes_the_plain_graph(lora_setup):
    from services.adapters import slot_inputs

    _, repo, _, slotted = lora_setup
    feed = _unet_inputs(repo)
    plain, _ = _session(repo / "sd_random_unet" / "1" / "model.onnx")
    session, shapes = _session(slotted["unet"])
    got = session.run(None, {**feed, **slot_inputs("sd_random_unet", shapes, [], np.zeros((3, 0), np.float32))})[0]
    np.testing.assert_allclose(got, plain.run(None, feed)[0], atol=1e-5)  # ORT may fuse a subgraph differently


def _refused(lora_setup, tmp_path, tensors: dict, match: str):
    import torch
    from safetensors.torch import save_file

    from export.lora import UnsupportedAdapter, export_lora

    _, repo, _, _ = lora_setup
    path = tmp_path / "bad.safetensors"
    save_file({k: torch.as_tensor(v, dtype=torch.float32).contiguous() for k, v in tensors.items()}, str(path))
    with pytest.raises(UnsupportedAdapter, match=match):
        export_lora(path, repo, "sd_random", "bad", progress=lambda _: None)


KEY = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.mark.parametrize("extra, match", [
    ({f"{KEY}.dora_scale": np.ones((1, 32))}, rf"{KEY}.dora_scale: DoRA"),
    ({f"{KEY}.hada_w1_a": np.ones((32, 4))}, r"hada_w1_a: LoHa"),
    ({f"{KEY}.lokr_w1": np.ones((4, 4))}, r"lokr_w1: LoKr"),
])
def test_unsupported_kinds_are_refused_naming_the_key(lora_setup, tmp_path, extra, match):
    base = {f"{KEY}.lora_down.weight": np.ones((4, 32)), f"{KEY}.lora_up.weight": np.ones((32, 4)),
            f"{KEY}.alpha": np.array(4.0)}
    _refused(lora_setup, tmp_path, {**base, **extra}, match)


def test_adapter_for_another_base_model_is_refused(lora_setup, tmp_path):
    _refused(lora_setup, tmp_path, {f"{KEY}.lora_down.weight": np.ones((4, 320)),
                                    f"{KEY}.lora_up.weight": np.ones((320, 4))},
             r"attn1\.to_q: a linear LoRA 320->320 .* does not fit sd_random_unet's linear 32->32")
    _refused(lora_setup, tmp_path, {"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": np.ones((4, 32)),
                                    "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": np.ones((32, 4))},
             r"down_blocks\.7\.attentions\.0\.proj_in: no layer of sd_random_unet matches it")


def test_cli_stores_an_adapter(lora_setup):
    from export.__main__ import main

    _, repo, files, _ = lora_setup
    assert main(["lora", "--pipeline", "sd_random", "--weights", str(files["kohya"]), "--name", "cli-kohya",
                 "--repository", str(repo)]) == 0
    assert (repo / "sd_random_unet" / "adapters" / "cli-kohya" / "adapter.json").exists()
    assert main(["lora", "--pipeline", "nope", "--weights", str(files["kohya"]), "--name", "x",
                 "--repository", str(repo)]) == 2


def test_cli_writes_slotted_graphs_beside_the_plain_ones(lora_setup, tmp_path):
    import shutil

    import onnx

    from export.__main__ import main

    _, repo, _, _ = lora_setup
    copy = tmp_path / "repo"
    for role in ("unet", "text_encoder"):
        shutil.copytree(repo / f"sd_random_{role}", copy / f"sd_random_{role}",
                        ignore=shutil.ignore_patterns("model_lora.onnx", "*_lora"))
    assert main(["lora-slots", "--pipeline", "sd_random", "--repository", str(copy)]) == 0
    for role in ("unet", "text_encoder"):
        inputs = {i.name for i in onnx.load(str(copy / f"sd_random_{role}" / "1" / "model_lora.onnx")).graph.input}
        plain = {i.name for i in onnx.load(str(copy / f"sd_random_{role}" / "1" / "model.onnx")).graph.input}
        assert "lora_scale" in inputs and "lora_scale" not in plain
        assert any(n.startswith("lora_down:") for n in inputs)
