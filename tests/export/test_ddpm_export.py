"""Export of pixel-space DDPM folders (UNet2DModel + scheduler config): the graph contract
in export/ddpm.py's docstring, parity with diffusers, both folder layouts, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.ddpm import export_ddpm, load_unet, locate
from export.diffusers_folder import UnsupportedFolder, detect_family
from export.verification import unet_activation
from services.engine.memory import ACTIVATION_BYTES_PARAMETER
from services.runtime.repository import ModelRepository
from tests.fixtures.ddpm_folder import build_random_ddpm_folder

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]

# name -> (build_random_ddpm_folder kwargs, an input size unlike the native one)
VARIANTS = {
    "cond_rgb": (dict(conditional=True, channels=3, levels=2, sample_size=16), (8, 24)),
    "uncond_gray_bare": (dict(conditional=False, channels=1, levels=3, sample_size=16, bare=True), (24, 8)),
    "cond_nonsquare": (dict(conditional=True, channels=1, levels=2, sample_size=(8, 16), seed=1), (16, 8)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """variant -> (folder, repository), each exported once."""
    torch.set_num_threads(1)
    out = {}
    for name, (kwargs, _) in VARIANTS.items():
        folder = build_random_ddpm_folder(tmp_path_factory.mktemp(f"ddpm_{name}"), **kwargs)
        repo = tmp_path_factory.mktemp(f"repo_{name}")
        reports = export_ddpm(folder, repo, name, progress=lambda _: None)
        assert [r.name for r in reports] == [f"{name}_unet"] and reports[0].max_abs_error < 1e-3
        out[name] = folder, repo
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_follows_the_contract(exported, variant):
    kwargs, _ = VARIANTS[variant]
    folder, repo = exported[variant]
    models = ModelRepository(repo).models
    assert set(models) == {f"{variant}_unet"}
    unet = models[f"{variant}_unet"]
    c = kwargs["channels"]
    conditional = kwargs["conditional"]
    assert [t.name for t in unet.inputs] == ["sample", "timestep"] + (["class_labels"] if conditional else [])
    assert unet.input("sample").dims == (c, -1, -1)
    assert unet.input("timestep").dims == (1,) and unet.input("timestep").reshape == ()
    if conditional:
        assert unet.input("class_labels").dims == (1,) and unet.input("class_labels").reshape == ()
    assert [(t.name, t.dims) for t in unet.outputs] == [("noise_pred", (c, -1, -1))]
    size = kwargs["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    expected = {
        "genserve.pipeline": "ddpm", "genserve.pipeline_name": variant, "genserve.component": "unet",
        "genserve.in_channels": str(c), "genserve.out_channels": str(c),
        "genserve.sample_height": str(h), "genserve.sample_width": str(w),
        "genserve.size_multiple": str(2 ** (kwargs["levels"] - 1)),
        "genserve.num_classes": "7" if conditional else "0", "genserve.output_range": "-1,1",
        "genserve.precision": "fp32",
        # The serving side bounds rows per call by the activation memory of one row at the native size.
        ACTIVATION_BYTES_PARAMETER: str(unet_activation(load_unet(locate(folder)[0]).config, (h, w),
                                                        2 ** (kwargs["levels"] - 1)).row_bytes((h, w))),
    }
    if h == w:
        expected["genserve.sample_size"] = str(h)
    assert unet.parameters == expected
    _, scheduler_config = locate(folder)
    copied = json.loads((unet.model_dir / "scheduler_config.json").read_text())
    assert copied == json.loads(scheduler_config.read_text())
    # the graph itself: dtypes and which axes are dynamic
    session = ort.InferenceSession(str(repo / f"{variant}_unet" / "1" / "model.onnx"))
    types = {i.name: i.type for i in session.get_inputs()}
    assert types == {"sample": "tensor(float)", "timestep": "tensor(float)",
                     **({"class_labels": "tensor(int64)"} if conditional else {})}
    assert session.get_inputs()[0].shape[1] == c and all(isinstance(d, str) for d in session.get_inputs()[0].shape[2:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_graph_matches_diffusers_per_sample(exported, variant):
    """Batch 4 (traced at 2), another size than native, four different timesteps in one call;
    and each row is what that request alone would get (step-level batching relies on it)."""
    from diffusers import UNet2DModel

    kwargs, (h, w) = VARIANTS[variant]
    folder, repo = exported[variant]
    unet_dir, _ = locate(folder)
    unet = UNet2DModel.from_pretrained(unet_dir).eval()
    session = ort.InferenceSession(str(repo / f"{variant}_unet" / "1" / "model.onnx"))
    rng = np.random.default_rng(1)
    feeds = {"sample": rng.standard_normal((4, kwargs["channels"], h, w), dtype=np.float32),
             "timestep": np.array([999.0, 500.0, 37.0, 0.0], np.float32)}
    if kwargs["conditional"]:
        feeds["class_labels"] = np.array([6, 0, 3, 3], np.int64)
    got = session.run(["noise_pred"], feeds)[0]
    with torch.no_grad():
        want = unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                    class_labels=torch.from_numpy(feeds["class_labels"]) if "class_labels" in feeds else None).sample
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-3)
    alone = session.run(["noise_pred"], {k: v[2:3] for k, v in feeds.items()})[0]
    np.testing.assert_allclose(alone[0], got[2], atol=1e-5)
    assert not np.allclose(got[2], session.run(["noise_pred"], {**{k: v[2:3] for k, v in feeds.items()},
                                                                "timestep": np.array([900.0], np.float32)})[0][0])


def test_cli_exports_a_ddpm_folder(tmp_path):
    folder = build_random_ddpm_folder(tmp_path / "folder", conditional=False, channels=1, sample_size=8)
    repo = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, "-m", "export", "ddpm", "--folder", str(folder), "--name", "cli_ddpm",
         "--repository", str(repo), "--max-batch-size", "8"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "cli_ddpm: ddpm, 1 graphs verified" in proc.stdout
    spec = ModelRepository(repo)["cli_ddpm_unet"]
    assert spec.max_batch_size == 8 and spec.parameters["genserve.num_classes"] == "0"
    assert (repo / "cli_ddpm_unet" / "scheduler_config.json").exists()


def test_generic_entry_detects_ddpm_and_refuses_what_it_cannot_serve(tmp_path):
    from export.__main__ import main

    folder = build_random_ddpm_folder(tmp_path / "pipe", channels=1, sample_size=8)
    assert detect_family(folder) == "ddpm" and detect_family(folder / "unet") == "ddpm"
    assert main(["diffusers", "--folder", str(folder), "--name", "via_index", "--repository", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "via_index_unet" / "config.pbtxt").exists()

    bare = build_random_ddpm_folder(tmp_path / "bare", channels=1, sample_size=8, bare=True)
    (bare / "scheduler_config.json").unlink()
    with pytest.raises(UnsupportedFolder, match="no scheduler config"):
        export_ddpm(bare, tmp_path / "r2", "x", progress=lambda _: None)
    assert main(["ddpm", "--folder", str(bare), "--name", "x", "--repository", str(tmp_path / "r2")]) == 2

    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(UnsupportedFolder, match="not a UNet2DModel"):
        locate(tmp_path / "vae")


def test_demo_samples_alike_through_onnx_and_the_numpy_ddim(tmp_path, classifier):
    """The committed demo, exported, sampled torch-free (ONNX Runtime + services' numpy DDIM,
    per-sample timesteps and labels) matches diffusers' DDIM loop on the same noise and draws
    the asked digits."""
    import diffusers

    from services.schedulers import make_scheduler
    from zoo.ddpm import CHECKPOINT

    if not (CHECKPOINT / "model_index.json").exists():
        pytest.skip("zoo/checkpoints/ddpm_digits is not trained yet")
    torch.set_num_threads(1)
    export_ddpm(CHECKPOINT, tmp_path, "ddpm_digits", progress=lambda _: None)
    model_dir = tmp_path / "ddpm_digits_unet"
    assert ModelRepository(tmp_path)["ddpm_digits_unet"].parameters["genserve.num_classes"] == "10"
    session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"))
    config = json.loads((model_dir / "scheduler_config.json").read_text())
    labels = np.repeat(np.arange(10), 2).astype(np.int64)
    noise = np.random.default_rng(0).standard_normal((20, 1, 32, 32)).astype(np.float32)

    ours = make_scheduler("ddim", config)
    ours.set_timesteps(20)
    x = noise.copy()
    for t in ours.timesteps:
        feeds = {"sample": x, "timestep": np.full(20, t, np.float32), "class_labels": labels}
        eps = session.run(["noise_pred"], feeds)[0]
        x = ours.step(eps, t, x).prev_sample.astype(np.float32)

    unet = diffusers.UNet2DModel.from_pretrained(CHECKPOINT / "unet").eval()
    ref = diffusers.DDIMScheduler.from_config(config)
    ref.set_timesteps(20)
    y = torch.from_numpy(noise)
    with torch.no_grad():
        for t in ref.timesteps:
            y = ref.step(unet(y, t, class_labels=torch.from_numpy(labels)).sample, t, y, eta=0.0).prev_sample
    np.testing.assert_allclose(x, y.numpy(), atol=2e-3)
    assert (classifier(np.clip(x, -1, 1)) == labels).mean() >= 0.8
