"""Train the digit VAE on CPU and save it as a diffusers AutoencoderKL folder.

    python -m zoo.vae.train                   # -> zoo/checkpoints/vae_digits/
    python -m zoo.vae.train --out /tmp/vae    # elsewhere

The model: 1-channel 32x32 images in [-1, 1] <-> 2x4x4 latents (four blocks, three
downsamplings, so the VAE scale factor is 8 as in Stable Diffusion), about 0.3M
parameters. The objective is the VAE's evidence lower bound with a Gaussian decoder:
per-pixel MSE + kl_weight x (KL(q(z|x) || N(0, I)) / pixels). The KL weight is far
stronger than an autoencoder for latent diffusion uses (zoo/latent_diffusion trains
with 1e-3; its latents are not N(0, I) and decoding noise there draws blobs), because
this VAE is also a generator on its own: the serving side decodes z ~ N(0, I) for
/v1/vae/sample and walks between encoded digits for /v1/vae/interpolate, which only
gives digits when the aggregate posterior fills the prior. 32 latent numbers suit
data that was 8x8 to begin with.

The KL weight, measured (700-800 steps, seed 0; held-out PSNR / classifier accuracy on
reconstructions / classifier's mean max softmax on 1,000 decoded N(0, I) samples, real
held-out digits score 0.947):
    0.02  28.1 dB  0.997  0.51  (KL 66 nats: noise decodes to stroke soup, mostly "8")
    0.1   28.0 dB  1.000  0.59
    0.4   27.3 dB  0.997  0.63
    1.0   26.3 dB  0.992  0.67  (KL 19 nats; the default: digit-like samples, sharp reconstructions)
    3.0   23.8 dB  0.978  0.71  (KL 11 nats: blurrier reconstructions for little gain)

Only the training 80% of `zoo.data.train_test_split` is used; the held-out 20% is
what `zoo.vae.evaluate` measures on. `scaling_factor` in config.json is 1 / std of the
posterior means over all digits, SD's recipe, for a latent diffusion model that would
train on these latents; the VAE endpoints themselves work in the VAE's own latent
space. Every random draw comes from one seeded torch.Generator (plus torch.manual_seed
for the initial weights); one thread by default (see zoo/latent_diffusion/train.py).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.data import load_digit_images, train_test_split
from zoo.latent_diffusion.train import batches, cosine_lr
from zoo.vae import CHECKPOINT


def build_vae(latent_channels: int = 2, block_out_channels=(16, 32, 32, 32)):
    """1-channel 32x32 <-> latent_channels x (32 / 2^(levels-1))^2; no attention in the
    mid block (at 4x4 it buys nothing and costs an op the graphs need not carry)."""
    from diffusers import AutoencoderKL

    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
        mid_block_add_attention=False,
    )


def train(x: torch.Tensor, args, gen: torch.Generator, start: float):
    vae = build_vae(args.latent_channels, args.block_out_channels)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, args.warmup))
    it = batches(len(x), args.batch_size, gen)
    running_mse = running_kl = 0.0
    for step in range(1, args.steps + 1):
        real = x[next(it)]
        post = vae.encode(real).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, real)
        kl = post.kl().mean() / real[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        running_mse += mse.item()
        running_kl += kl.item()
        if step % 100 == 0 or step == args.steps:
            n = 100 if step % 100 == 0 else step % 100
            print(f"vae  step {step:5d}  mse {running_mse / n:.4f}  kl/px {running_kl / n:.4f}  "
                  f"(kl {running_kl / n * real[0].numel():.1f} nats)  {time.perf_counter() - start:.0f} s",
                  flush=True)
            running_mse = running_kl = 0.0
    return vae.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CHECKPOINT))
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--kl-weight", type=float, default=1.0, help="x KL per pixel (see the docstring)")
    parser.add_argument("--latent-channels", type=int, default=2)
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=[16, 32, 32, 32])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (at most 2 here); 1 is fastest on a shared 2-core box")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    from zoo.checkpoint import load_checkpoint
    from zoo.vae.evaluate import figures

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(args.out)

    x, _ = load_digit_images()
    train_idx, _ = train_test_split(len(x))
    vae = train(x[torch.from_numpy(train_idx)], args, gen, start)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start

    with torch.no_grad():
        means = torch.cat([vae.encode(x[i : i + 256]).latent_dist.mean for i in range(0, len(x), 256)])
    scaling = round(1.0 / means.std().item(), 5)
    vae.register_to_config(scaling_factor=scaling)
    print(f"latents {tuple(means.shape[1:])}: mean {means.mean().item():.3f} std {means.std().item():.3f} "
          f"-> scaling_factor {scaling}", flush=True)
    vae.save_pretrained(out, safe_serialization=True)

    stats = figures(vae, load_checkpoint("digit_classifier"), seed=args.seed)
    print(json.dumps(stats, indent=2), flush=True)
    training = {k: v for k, v in vars(args).items() if k != "out"}
    training.update(
        scaling_factor=scaling, latent_shape=list(means.shape[1:]),
        latent_mean=round(means.mean().item(), 4), latent_std=round(means.std().item(), 4),
        parameters=sum(p.numel() for p in vae.parameters()),
        wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
        data="sklearn digits 32x32, the 1,438 training images of zoo.data.train_test_split",
        torch=torch.__version__, diffusers=diffusers.__version__, figures=stats,
    )
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"saved {out}  training wall time {wall:.0f} s (CPU {cpu:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
