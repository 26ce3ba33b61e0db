"""GANs as users bring them: `python -m export gan --module FILE.py:NAME --weights ...`.

Each generator in tests/fixtures/generators/ is built here with random weights (batch-norm
running statistics made non-trivial, so eval mode matters), saved as a user would save it,
exported through the CLI, and compared with the PyTorch module: the graph at a batch size
other than the traced one, and the served GAN pipeline for documented seeds and labels.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from export.__main__ import main
from export.gan import GANExportError, export_gan_module
from services.pipelines.pipeline_gan import GANModelInfo, GANPipeline
from services.runtime.onnxruntime_backend import OnnxRuntimeBackend
from services.runtime.repository import ModelRepository
from tests.fixtures.checkpoints_as_published import save_as_if_on_cuda
from tests.fixtures.generators.broken import Flat
from tests.fixtures.generators.conditional import make_generator
from tests.fixtures.generators.dcgan import DCGAN
from tests.fixtures.generators.dcgan_tutorial import Generator as DCGANTutorial
from tests.fixtures.generators.upsample import UpsampleGenerator

ROOT = Path(__file__).resolve().parents[2]
GENERATORS = ROOT / "tests" / "fixtures" / "generators"


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and batch-norm running statistics far from (0, 1), in eval mode."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def _torch_images(model: nn.Module, z: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        args = (torch.from_numpy(z),) if labels is None else (torch.from_numpy(z), torch.from_numpy(labels))
        return model(*args).numpy()


def _served(repo: Path, name: str, seed: int, n: int, class_label: int | None = None):
    pipeline = GANPipeline(OnnxRuntimeBackend(ModelRepository(repo)), name)
    return asyncio.run(pipeline(seed, n, 1.0, class_label))


def _documented_inputs(seed: int, n: int, latent_shape: int | tuple[int, ...], num_classes: int = 0,
                       class_label: int | None = None):
    """The README's rule: image i uses default_rng(seed + i) for z, then (no label asked) its label."""
    z, labels = [], []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        z.append(rng.standard_normal(latent_shape, dtype=np.float32))
        if num_classes:
            labels.append(class_label if class_label is not None else rng.integers(num_classes))
    return np.stack(z), (np.array(labels, dtype=np.int64) if num_classes else None)


# --- exports (module scope: each is traced and verified once) --------------------------------


@pytest.fixture(scope="module")
def dcgan(tmp_path_factory):
    """Transposed convs, 3 channels, 16x16, safetensors, exported by `python -m export` in a subprocess."""
    tmp = tmp_path_factory.mktemp("dcgan")
    model = _randomised(DCGAN(nz=16, ngf=8, nc=3), 1)
    save_file(_state(model), str(tmp / "dcgan.safetensors"))
    repo = tmp / "repo"
    cmd = [sys.executable, "-m", "export", "gan", "--module", f"{GENERATORS / 'dcgan.py'}:DCGAN",
           "--weights", str(tmp / "dcgan.safetensors"), "--name", "user_dcgan", "--latent-dim", "16",
           "--init-args", '{"nz": 16, "ngf": 8, "nc": 3}', "--output-range", "-1,1",
           "--max-batch-size", "8", "--repository", str(repo)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "user_dcgan" in done.stdout and "verified" in done.stdout
    return model, repo


@pytest.fixture(scope="module")
def upsample(tmp_path_factory):
    """Upsample + conv, batch norm, 1 channel, 28x20 (non-square), range [0, 1], a .pt state dict."""
    tmp = tmp_path_factory.mktemp("upsample")
    model = _randomised(UpsampleGenerator(latent_dim=12, width=8), 2)
    torch.save(_state(model), tmp / "upsample.pt")
    repo = tmp / "repo"
    report = export_gan_module(f"{GENERATORS / 'upsample.py'}:UpsampleGenerator", tmp / "upsample.pt", repo,
                               "user_upsample", latent_dim=12, init_args={"latent_dim": 12, "width": 8},
                               output_range="0,1", max_batch_size=4)
    return model, repo, report


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A factory function, nn.Embedding conditioning, bilinear upsampling to RGB 24x24, a .pth state dict."""
    tmp = tmp_path_factory.mktemp("conditional")
    model = _randomised(make_generator(latent_dim=10, num_classes=7, width=8), 3)
    torch.save(_state(model), tmp / "cond.pth")
    repo = tmp / "repo"
    assert main(["gan", "--module", f"{GENERATORS / 'conditional.py'}:make_generator", "--weights",
                 str(tmp / "cond.pth"), "--name", "user_cgan", "--latent-dim", "10", "--num-classes", "7",
                 "--init-args", '{"latent_dim": 10, "num_classes": 7, "width": 8}',
                 "--repository", str(repo)]) == 0
    return model, repo


# --- what was written ----------------------------------------------------------------------------


def test_configs_carry_the_facts_learned_by_running_the_generator(dcgan, upsample, conditional):
    p = ModelRepository(dcgan[1])["user_dcgan"].parameters
    assert (p["genserve.pipeline"], p["genserve.latent_dim"], p["genserve.num_classes"]) == ("gan", "16", "0")
    assert (p["genserve.image_channels"], p["genserve.image_size"], p["genserve.output_range"]) == ("3", "16", "-1,1")
    assert p["genserve.source_module"] == "dcgan.py:DCGAN" and len(p["genserve.source_sha256"]) == 64

    spec = ModelRepository(upsample[1])["user_upsample"]
    p = spec.parameters
    assert (p["genserve.image_channels"], p["genserve.image_height"], p["genserve.image_width"]) == ("1", "28", "20")
    assert p["genserve.image_size"] == "28"  # the height, for readers that know one side only
    assert p["genserve.output_range"] == "0,1"
    assert spec.max_batch_size == 4 and [t.name for t in spec.inputs] == ["z"]
    assert tuple(spec.outputs[0].dims) == (1, 28, 20)
    assert upsample[2].facts.image_width == 20 and upsample[2].max_abs_error < 1e-4

    spec = ModelRepository(conditional[1])["user_cgan"]
    assert [t.name for t in spec.inputs] == ["z", "class_label"]
    assert spec.parameters["genserve.num_classes"] == "7"
    assert spec.parameters["genserve.source_module"] == "conditional.py:make_generator"
    assert tuple(spec.outputs[0].dims) == (3, 24, 24)


# --- parity: graph and served pipeline vs PyTorch -----------------------------------------------


@pytest.mark.parametrize("which", ["dcgan", "upsample", "conditional"])
def test_graph_matches_pytorch_at_another_batch_size(which, request):
    model, repo = request.getfixturevalue(which)[:2]
    spec = next(iter(ModelRepository(repo).models.values()))
    latent_dim = int(spec.parameters["genserve.latent_dim"])
    num_classes = int(spec.parameters["genserve.num_classes"])
    rng = np.random.default_rng(7)
    z = rng.standard_normal((7, latent_dim), dtype=np.float32)  # traced at 2, verified at 5
    feeds = {"z": z}
    labels = None
    if num_classes:
        feeds["class_label"] = labels = rng.integers(0, num_classes, 7).astype(np.int64)
    got = ort.InferenceSession(str(spec.model_file)).run(["image"], feeds)[0]
    want = _torch_images(model, z, labels)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_served_unconditional_images_equal_pytorch(dcgan, upsample):
    for (model, repo, *_), name, latent_dim in ((dcgan, "user_dcgan", 16), (upsample, "user_upsample", 12)):
        out = _served(repo, name, seed=123, n=6)  # user_upsample: 6 > max batch 4, split by the backend
        z, _ = _documented_inputs(123, 6, latent_dim)
        np.testing.assert_allclose(out.images, _torch_images(model, z), atol=1e-4, rtol=1e-3)
        assert out.seeds == list(range(123, 129)) and out.class_labels is None


def test_served_conditional_images_equal_pytorch_for_asked_and_drawn_labels(conditional):
    model, repo = conditional
    for class_label in (5, None):
        out = _served(repo, "user_cgan", seed=40, n=5, class_label=class_label)
        z, labels = _documented_inputs(40, 5, 10, num_classes=7, class_label=class_label)
        assert out.class_labels == labels.tolist()
        np.testing.assert_allclose(out.images, _torch_images(model, z, labels), atol=1e-4, rtol=1e-3)
    assert len(set(labels.tolist())) > 1  # drawn labels differ between seeds


# --- z as a map: the DCGAN tutorial's generator, as its checkpoints are published ----------------


@pytest.fixture(scope="module")
def dcgan_tutorial(tmp_path_factory):
    """forward(z [N, 16, 1, 1]); weights.tar: a torch zip saved on CUDA, under netG_state_dict,
    beside the discriminator's optimizer state, keys with DataParallel's `module.`."""
    tmp = tmp_path_factory.mktemp("dcgan_tutorial")
    model = _randomised(DCGANTutorial(ngpu=1, nc=3, nz=16, ngf=4), 4)
    optimizer = torch.optim.Adam(model.parameters())
    save_as_if_on_cuda({"netG_state_dict": {f"module.{k}": v for k, v in _state(model).items()},
                        "optimizerG_state_dict": optimizer.state_dict(), "epoch": 5}, tmp / "weights.tar")
    repo = tmp / "repo"
    assert main(["gan", "--module", f"{GENERATORS / 'dcgan_tutorial.py'}:Generator", "--weights",
                 str(tmp / "weights.tar"), "--name", "tutorial", "--latent-shape", "16,1,1",
                 "--init-args", '{"ngpu": 1, "nc": 3, "nz": 16, "ngf": 4}', "--repository", str(repo)]) == 0
    return model, repo, tmp / "weights.tar"


def test_a_map_latent_is_the_graph_input_and_in_the_config(dcgan_tutorial):
    spec = ModelRepository(dcgan_tutorial[1])["tutorial"]
    assert [(t.name, tuple(t.dims)) for t in spec.inputs] == [("z", (16, 1, 1))]
    p = spec.parameters
    assert (p["genserve.latent_shape"], p["genserve.latent_dim"], p["genserve.image_size"]) == ("16,1,1", "16", "16")


def test_served_map_latents_follow_the_seed_rule_and_equal_pytorch(dcgan_tutorial):
    model, repo, _ = dcgan_tutorial
    pipeline = GANPipeline(OnnxRuntimeBackend(ModelRepository(repo)), "tutorial")
    for psi in (1.0, 0.5):
        out = asyncio.run(pipeline(77, 4, psi))
        z, _ = _documented_inputs(77, 4, (16, 1, 1))  # z = psi * rng.standard_normal(latent_shape)
        np.testing.assert_allclose(out.images, _torch_images(model, psi * z), atol=1e-4, rtol=1e-3)
    vector = ModelRepository(repo)["tutorial"].parameters | {"genserve.latent_shape": ""}
    assert GANModelInfo.from_spec(type("Spec", (), {"parameters": vector})()).latent_shape == (16,)


def test_a_map_generator_given_a_vector_latent_says_which_option_fits(dcgan_tutorial, tmp_path, capsys):
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'dcgan_tutorial.py'}:Generator", "--weights",
                     str(dcgan_tutorial[2]), "--name", "x", "--latent-dim", "16", "--init-args",
                     '{"ngpu": 1, "nc": 3, "nz": 16, "ngf": 4}', "--repository", str(tmp_path))
    assert code == 2 and "with z float32 [3, 16] failed" in err and "takes --latent-shape 16,1,1" in err
    for both_or_none in (["--latent-dim", "16", "--latent-shape", "16,1,1"], []):
        with pytest.raises(SystemExit):
            _cli(capsys, "--module", f"{GENERATORS / 'dcgan_tutorial.py'}:Generator", "--weights",
                 str(dcgan_tutorial[2]), "--name", "x", *both_or_none)
        assert "--latent-dim N (a vector) or --latent-shape C,H,W" in capsys.readouterr().err
    for bad in ("16,x,1", "16,0,1"):
        with pytest.raises(GANExportError, match="--latent-shape"):
            export_gan_module(f"{GENERATORS / 'dcgan_tutorial.py'}:Generator", dcgan_tutorial[2], tmp_path, "x",
                              latent_shape=bad)


# --- refusals ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flat_weights(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("flat")
    save_file(_state(Flat(8)), str(tmp / "flat.safetensors"))
    return tmp / "flat.safetensors"


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["gan", *args])
    return code, capsys.readouterr().err


def test_a_pickled_module_is_refused_with_how_to_convert_it(tmp_path, capsys):
    torch.save(DCGAN(nz=16, ngf=8, nc=3), tmp_path / "whole_model.pt")  # the model object, not its state dict
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'dcgan.py'}:DCGAN", "--weights",
                     str(tmp_path / "whole_model.pt"), "--name", "x", "--latent-dim", "16",
                     "--repository", str(tmp_path / "repo"))
    assert code == 2
    assert "weights_only=True" in err and "not a plain state dict" in err
    assert "torch.save(torch.load(p, weights_only=False).state_dict()" in err and "save_file" in err
    assert not (tmp_path / "repo").exists()


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = _state(DCGAN(nz=16, ngf=8, nc=3))
    del state["main.1.running_var"], state["main.0.weight"]
    state["extra.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(GANExportError) as info:
        export_gan_module(f"{GENERATORS / 'dcgan.py'}:DCGAN", tmp_path / "partial.safetensors", tmp_path, "x", 16)
    message = str(info.value)
    assert "2 missing: 'main.0.weight', 'main.1.running_var'" in message and "1 unexpected: 'extra.bias'" in message


def test_a_state_dict_for_other_init_args_names_the_shapes(tmp_path):
    save_file(_state(DCGAN(nz=16, ngf=4, nc=3)), str(tmp_path / "narrow.safetensors"))
    match = r"shapes differ: 'main.0.weight' \(16, 16, 4, 4\) in the file.*--init-args"
    with pytest.raises(GANExportError, match=match):
        export_gan_module(f"{GENERATORS / 'dcgan.py'}:DCGAN", tmp_path / "narrow.safetensors", tmp_path, "x", 16)


def test_a_forward_returning_the_wrong_rank_is_refused(tmp_path, flat_weights, capsys):
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'broken.py'}:Flat", "--weights", str(flat_weights),
                     "--name", "x", "--latent-dim", "8", "--repository", str(tmp_path))
    assert code == 2 and "returned shape [3, 784] (2-D)" in err and "4-D NCHW" in err


def test_images_that_depend_on_their_batch_mates_are_refused(tmp_path):
    from tests.fixtures.generators.broken import BatchCoupled

    save_file(_state(BatchCoupled(8)), str(tmp_path / "coupled.safetensors"))
    with pytest.raises(GANExportError, match="depends on the other latents in its batch"):
        export_gan_module(f"{GENERATORS / 'broken.py'}:BatchCoupled", tmp_path / "coupled.safetensors",
                          tmp_path, "x", 8)


def test_module_refs_and_argument_combinations(tmp_path, flat_weights, capsys):
    common = ["--weights", str(flat_weights), "--name", "x", "--latent-dim", "8", "--repository", str(tmp_path)]
    code, err = _cli(capsys, "--module", str(GENERATORS / "broken.py"), *common)  # no :NAME
    assert code == 2 and "expected FILE.py:NAME" in err
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'broken.py'}:Nope", *common)
    assert code == 2 and "has no 'Nope'" in err and "Flat" in err
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'broken.py'}:Flat", *common,
                     "--init-args", '{"latent_dim": 9}')  # the weights are for latent 8
    assert code == 2 and "do not fit the model" in err and "'fc.weight' (784, 8) in the file, (784, 9)" in err
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'broken.py'}:Flat", *common[:-4], "--latent-dim", "9",
                     "--repository", str(tmp_path))  # builds for 8, is fed 9
    assert code == 2 and "is --latent-dim 9 right" in err
    code, err = _cli(capsys, "--module", f"{GENERATORS / 'broken.py'}:Flat", *common, "--num-classes", "3")
    assert code == 2 and "forward(z, class_label)" in err and "without --num-classes" in err
    with pytest.raises(SystemExit) as exit_info:  # argparse: one source or the other
        main(["gan", "--checkpoint", "cgan_digits", "--module", f"{GENERATORS / 'broken.py'}:Flat", *common])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gan", "--module", f"{GENERATORS / 'broken.py'}:Flat", "--name", "x"])
    assert "--module needs --weights and z's shape: --latent-dim N" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gan", "--checkpoint", "cgan_digits", "--name", "x", "--latent-dim", "8"])
    assert "--latent-dim: only with --module" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gan", "--module", f"{GENERATORS / 'broken.py'}:Flat", *common, "--init-args", "[1]"])
    assert "JSON object" in capsys.readouterr().err
