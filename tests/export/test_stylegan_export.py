"""`python -m export stylegan`: two verified graphs (mapping, synthesis) under the documented contract,
w_avg.json and directions.json beside the mapping config, NVIDIA-style modules as users bring them."""

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

from export.__main__ import main
from export.gan import GANExportError
from export.stylegan import StyleGANExportError, export_stylegan, export_stylegan_module
from tests.fixtures import stylegan_module as fx

ROOT = Path(__file__).resolve().parents[2]
MODULE = Path(fx.__file__)


def _config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def _session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def unconditional(tmp_path_factory):
    """(generator, repository): the 3-channel 16x16 unconditional fixture, via the CLI in a subprocess."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("stylegan_uncond")
    g = fx.TinyStyleGAN(z_dim=12, c_dim=0, img_resolution=16, img_channels=3).eval()
    fx.save_weights(g, tmp / "G.safetensors")
    cmd = [sys.executable, "-m", "export", "stylegan", "--module", f"{MODULE}:TinyStyleGAN",
           "--weights", str(tmp / "G.safetensors"), "--name", "tiny", "--repository", str(tmp / "repo"),
           "--init-args", '{"z_dim": 12, "img_resolution": 16, "img_channels": 3}']
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "tiny_mapping + tiny_synthesis verified" in done.stdout
    return g, tmp / "repo"


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """(generator, repository, report): the 4-class fixture (a factory, a .pt state dict), in-process."""
    torch.manual_seed(1)
    tmp = tmp_path_factory.mktemp("stylegan_cond")
    g = fx.conditional(c_dim=4, img_channels=1).eval()
    torch.save(g.state_dict(), tmp / "G.pt")
    report = export_stylegan_module(f"{MODULE}:conditional", tmp / "G.pt", tmp / "repo", "cond",
                                    init_args={"c_dim": 4, "img_channels": 1})
    return g, tmp / "repo", report


def test_configs_carry_the_contract(unconditional, conditional):
    for repo, name, facts in ((unconditional[1], "tiny", dict(z=12, c=0, ch=3, res=16, num_ws=4)),
                              (conditional[1], "cond", dict(z=12, c=4, ch=1, res=16, num_ws=4))):
        mapping, synthesis = _config(repo / f"{name}_mapping"), _config(repo / f"{name}_synthesis")
        for config, component in ((mapping, "mapping"), (synthesis, "synthesis")):
            p = {k: v.string_value for k, v in config.parameters.items()}
            assert p["genserve.pipeline"] == "stylegan" and p["genserve.pipeline_name"] == name
            assert p["genserve.component"] == component
            assert (p["genserve.z_dim"], p["genserve.c_dim"], p["genserve.w_dim"], p["genserve.num_ws"]) == (
                str(facts["z"]), str(facts["c"]), "16", str(facts["num_ws"]))
            assert (p["genserve.image_channels"], p["genserve.image_height"], p["genserve.image_width"]) == (
                str(facts["ch"]), str(facts["res"]), str(facts["res"]))
            assert p["genserve.output_range"] == "-1,1"
            assert config.max_batch_size == 16 and config.backend == "onnxruntime"
        ins = {t.name: (t.data_type, list(t.dims)) for t in mapping.input}
        want = {"z": (mc.TYPE_FP32, [facts["z"]])} | ({"c": (mc.TYPE_FP32, [facts["c"]])} if facts["c"] else {})
        assert ins == want
        assert [(t.name, t.data_type, list(t.dims)) for t in mapping.output] == [("w", mc.TYPE_FP32, [16])]
        assert [(t.name, list(t.dims)) for t in synthesis.input] == [("ws", [facts["num_ws"], 16])]
        assert [(t.name, t.data_type, list(t.dims)) for t in synthesis.output] == [
            ("image", mc.TYPE_FP32, [facts["ch"], facts["res"], facts["res"]])]


@pytest.mark.parametrize("which", ["unconditional", "conditional"])
def test_both_graphs_match_pytorch_at_other_batch_sizes(which, request):
    g, repo = request.getfixturevalue(which)[:2]
    name = "tiny" if which == "unconditional" else "cond"
    mapping, synthesis = _session(repo / f"{name}_mapping"), _session(repo / f"{name}_synthesis")
    gen = torch.Generator().manual_seed(7)
    for batch in (1, 7):
        z = torch.randn(batch, g.z_dim, generator=gen)
        c = torch.nn.functional.one_hot(torch.arange(batch) % g.c_dim, g.c_dim).float() if g.c_dim else None
        feeds = {"z": z.numpy()} | ({"c": c.numpy()} if c is not None else {})
        (w,) = mapping.run(None, feeds)
        with torch.no_grad():
            ws = g.mapping(z, c)
            np.testing.assert_allclose(w, ws[:, 0].numpy(), atol=1e-5, rtol=1e-4)
            # truncation by the caller, as the service does it, then the synthesis graph
            w_avg = np.array(json.loads((repo / f"{name}_mapping" / "w_avg.json").read_text())["w_avg"],
                             dtype=np.float32)
            wt = w_avg + 0.7 * (w - w_avg)
            want = g.synthesis(g.mapping(z, c, truncation_psi=0.7), noise_mode="const").numpy()
        (image,) = synthesis.run(None, {"ws": np.repeat(wt[:, None], g.num_ws, axis=1)})
        assert image.shape == (batch, g.img_channels, g.img_resolution, g.img_resolution)
        np.testing.assert_allclose(image, want, atol=1e-4, rtol=1e-3)


def test_w_avg_is_the_mapping_buffer(unconditional, conditional):
    for (g, repo), name in ((unconditional, "tiny"), (conditional[:2], "cond")):
        data = json.loads((repo / f"{name}_mapping" / "w_avg.json").read_text())
        np.testing.assert_allclose(data["w_avg"], g.mapping.w_avg.numpy(), rtol=1e-6)


def test_directions_are_raw_class_mean_differences(unconditional, conditional):
    assert json.loads((unconditional[1] / "tiny_mapping" / "directions.json").read_text())["directions"] == {}
    g, repo, _ = conditional
    directions = json.loads((repo / "cond_mapping" / "directions.json").read_text())["directions"]
    assert list(directions) == ["class_cat", "class_dog", "class_fox", "class_owl"]  # the module's class names
    z = torch.randn(1000, g.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        means = torch.stack([g.mapping(z, torch.nn.functional.one_hot(torch.full((1000,), k), 4).float())[:, 0]
                             .mean(0) for k in range(4)])
    d = np.array(list(directions.values()))
    np.testing.assert_allclose(d, (means - means.mean(0)).numpy(), atol=1e-5)
    np.testing.assert_allclose(d.sum(0), 0, atol=1e-5)  # differences from the mean of the class means
    assert not np.allclose(np.linalg.norm(d, axis=1), 1.0)  # raw, not unit length


def test_directions_fall_back_to_indices_without_class_names(tmp_path):
    torch.manual_seed(2)
    g = fx.TinyStyleGAN(c_dim=3).eval()
    export_stylegan(g, tmp_path, "idx")
    directions = json.loads((tmp_path / "idx_mapping" / "directions.json").read_text())["directions"]
    assert list(directions) == ["class_0", "class_1", "class_2"]


def test_noise_is_constant_in_the_synthesis_graph(unconditional):
    g, repo = unconditional
    ws = np.random.default_rng(0).standard_normal((2, g.num_ws, g.w_dim)).astype(np.float32)
    session = _session(repo / "tiny_synthesis")
    np.testing.assert_array_equal(session.run(None, {"ws": ws})[0], session.run(None, {"ws": ws})[0])


def test_a_module_without_the_nvidia_interface_is_refused(tmp_path, capsys):
    fx.save_weights(fx.NotAStyleGAN(), tmp_path / "G.safetensors")
    code = main(["stylegan", "--module", f"{MODULE}:NotAStyleGAN", "--weights", str(tmp_path / "G.safetensors"),
                 "--name", "x", "--repository", str(tmp_path / "repo")])
    assert code == 2
    err = capsys.readouterr().err
    assert "lacks" in err and "mapping" in err and "export gan" in err
    assert issubclass(StyleGANExportError, GANExportError)


def test_pickled_modules_are_refused(tmp_path, capsys):
    torch.save(fx.TinyStyleGAN(), tmp_path / "G.pt")  # a whole module: loading it would run code
    code = main(["stylegan", "--module", f"{MODULE}:TinyStyleGAN", "--weights", str(tmp_path / "G.pt"),
                 "--name", "x", "--repository", str(tmp_path / "repo")])
    assert code == 2
    assert "weights_only" in capsys.readouterr().err


def test_bad_init_args_are_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["stylegan", "--module", f"{MODULE}:TinyStyleGAN", "--weights", "G.safetensors", "--name", "x",
              "--init-args", "[1, 2]"])
    assert exc.value.code == 2
