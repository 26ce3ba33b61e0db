"""The committed class-conditional pixel DDPM (zoo/checkpoints/ddpm_digits/): a small
DDPMPipeline folder that diffusers loads offline, whose scheduler config the serving
side's numpy schedulers accept, and which draws the digit it is asked for."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from zoo.ddpm import CHECKPOINT, load_scheduler_config, load_unet  # noqa: E402


def test_folder_is_a_small_safetensors_ddpm_pipeline():
    index = json.loads((CHECKPOINT / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDPMScheduler"]
    files = [p for p in CHECKPOINT.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert [p.relative_to(CHECKPOINT).as_posix() for p in weights] == ["unet/diffusion_pytorch_model.safetensors"]
    assert sum(p.stat().st_size for p in files) < 5_000_000
    training = json.loads((CHECKPOINT / "training.json").read_text())
    assert training["seed"] == 0 and training["wall_seconds"] > 0
    metrics = training["metrics"]
    assert metrics["steps"] == 20 and metrics["accuracy"] >= 0.9 and len(metrics["per_digit"]) == 10


def test_diffusers_loads_it_as_a_class_conditional_unet():
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDPMPipeline.from_pretrained(str(CHECKPOINT), local_files_only=True)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    c = pipe.unet.config
    assert (c.sample_size, c.in_channels, c.out_channels, c.num_class_embeds) == (32, 1, 1, 10)
    s = pipe.scheduler.config
    assert (s.num_train_timesteps, s.beta_schedule, s.prediction_type) == (1000, "squaredcos_cap_v2", "epsilon")
    assert s.clip_sample is True and s.timestep_spacing == "trailing"
    ddim = DDIMScheduler.from_config(s)
    ddim.set_timesteps(20)
    assert int(ddim.timesteps[0]) == 999  # starts from pure noise
    x = torch.zeros(2, 1, 32, 32)
    with torch.no_grad():
        out = pipe.unet(x, torch.tensor([999.0, 10.0]), class_labels=torch.tensor([3, 7])).sample
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_scheduler_config_loads_in_the_serving_schedulers(name):
    """services/schedulers (numpy) build from the shipped config and agree with diffusers."""
    import diffusers

    from services.schedulers import make_scheduler

    config = load_scheduler_config()
    ours = make_scheduler(name, config)
    ref = {"ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[name].from_config(config)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-5, atol=1e-7)
    rng = np.random.default_rng(0)
    x, eps = rng.standard_normal((2, 2, 1, 32, 32), dtype=np.float32)
    t = int(ref.timesteps[5])
    if name == "ddim":
        want = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
        np.testing.assert_allclose(ours.step(eps, t, x).prev_sample, want, atol=1e-4)


@pytest.mark.slow
def test_draws_the_requested_digit_at_20_ddim_steps():
    """>= 90% of 10 samples per digit at 20 DDIM steps (eta 0, seed 0) are the asked digit."""
    from zoo.checkpoint import load_checkpoint
    from zoo.ddpm.evaluate import digit_accuracy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = digit_accuracy(load_unet(), load_scheduler_config(), load_checkpoint("digit_classifier"),
                           per_digit=10, steps=20, seed=0)
    finally:
        torch.set_num_threads(threads)
    assert r["accuracy"] >= 0.9, r["per_digit"]
    assert min(r["per_digit"]) >= 0.6, r["per_digit"]
    images = r["images"]
    assert images.shape == (100, 1, 32, 32) and images.min() >= -1 and images.max() <= 1
    from zoo.evaluate import diversity_ratio

    # variety: not one template per digit (within-digit pixel spread relative to the real digits)
    assert diversity_ratio(images, torch.arange(10).repeat_interleave(10)) >= 0.5
