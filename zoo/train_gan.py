"""Train a demo GAN on the digits.

    python -m zoo.train_gan --name dcgan_digits                  # unconditional
    python -m zoo.train_gan --name cgan_digits --conditional     # class-conditional

Recipe chosen for stability on 1,797 images and a few CPU minutes: hinge loss,
spectral-norm (projection) discriminator with a minibatch-stddev channel, one D
step per G step, Adam(lr 4e-4, betas (0, 0.999)), and an exponential moving
average of G's weights (the EMA generator is what gets saved: it averages out the
oscillation of the adversarial game). On this data 4e-4 for both beat a
two-time-scale 1e-4 (G) / 4e-4 (D) for the unconditional model at equal steps.

The unconditional G must carve one Gaussian into ten separate digit clusters and
keeps sharpening them long after the conditional G is done (classifier mean
confidence 0.73 after 1,500 steps, 0.78 after 3,000), hence twice the steps:
about 53 epochs conditional, 107 unconditional.

All data is used for training; the saved JSON records how the committed digit
classifier judges the samples.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np
import torch
import torch.nn as nn

from zoo.checkpoint import CHECKPOINT_DIR, load_checkpoint, save_checkpoint
from zoo.data import NUM_CLASSES, load_digit_images
from zoo.evaluate import judge
from zoo.gan import DCGANGenerator, Discriminator, hinge_d_loss, hinge_g_loss


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """theta_ema <- decay * theta_ema + (1 - decay) * theta (parameters only)."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


@torch.no_grad()
def recalibrate_batchnorm(g: DCGANGenerator, batches: int = 50, batch_size: int = 256, seed: int = 0) -> None:
    """Re-estimates BatchNorm running statistics for the EMA weights.

    Running stats copied from the raw G belong to different weights; a cumulative
    average (momentum=None) over fresh z ~ N(0, I) makes eval-mode outputs match
    what the averaged weights actually produce.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    g.train()
    for _ in range(batches):
        z = torch.randn(batch_size, g.latent_dim, generator=gen)
        y = torch.randint(0, g.num_classes, (batch_size,), generator=gen) if g.num_classes else None
        g(z, y)
    for m in norms:
        m.momentum = 0.1
    g.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--conditional", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="generator updates (default 1500 conditional, 3000 unconditional)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-g", type=float, default=4e-4)
    parser.add_argument("--lr-d", type=float, default=4e-4)
    parser.add_argument("--eval-every", type=int, default=0, help="judge the EMA generator every N steps")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--out-dir", help="default: zoo/checkpoints")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 1500 if args.conditional else 3000

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # data order and latents
    start = time.perf_counter()

    x, y = load_digit_images()
    num_classes = NUM_CLASSES if args.conditional else 0
    config = {"latent_dim": 64, "num_classes": num_classes, "image_channels": 1, "image_size": 32, "base_channels": 32}
    g = DCGANGenerator(**config)
    d = Discriminator(num_classes, 1, base_channels=32)
    g_ema = copy.deepcopy(g)
    opt_g = torch.optim.Adam(g.parameters(), lr=args.lr_g, betas=(0.0, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr_d, betas=(0.0, 0.999))
    classifier = load_checkpoint("digit_classifier") if (CHECKPOINT_DIR / "digit_classifier.json").exists() else None

    order, pos = torch.randperm(len(y), generator=gen), 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):  # new epoch: fresh seeded shuffle
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos : pos + args.batch_size]
        pos += args.batch_size
        real, labels = x[idx], (y[idx] if num_classes else None)
        z = torch.randn(len(idx), g.latent_dim, generator=gen)

        fake = g(z, labels)  # fake labels = real labels: class balance of the data
        loss_d = hinge_d_loss(d(real, labels), d(fake.detach(), labels))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        loss_g = hinge_g_loss(d(fake, labels))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        # Warm-up: a plain copy early on so the EMA is not dominated by the random init.
        ema_update(g_ema, g, min(args.ema_decay, (1 + step) / (10 + step)))

        if step % 250 == 0 or step == args.steps:
            print(f"step {step:5d}  loss_d {loss_d.item():.3f}  loss_g {loss_g.item():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.eval_every and step % args.eval_every == 0 and classifier is not None:
            snapshot = copy.deepcopy(g_ema)
            recalibrate_batchnorm(snapshot, batches=10)
            print(f"  {judge(snapshot, classifier)}", flush=True)

    recalibrate_batchnorm(g_ema, seed=args.seed)
    wall = time.perf_counter() - start
    training = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "data": "sklearn digits 32x32, all 1,797 images",
        "recipe": f"hinge loss, spectral-norm {'projection ' if num_classes else ''}discriminator with "
                  f"minibatch stddev, Adam lr G {args.lr_g} / D {args.lr_d} betas (0, 0.999), "
                  f"EMA {args.ema_decay} of G, BatchNorm recalibrated",
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(time.process_time(), 1),  # less sensitive than wall time to a shared machine
    }
    if classifier is not None:
        metrics = judge(g_ema, classifier, seed=0)
        training["metrics"] = {"judged_by": "digit_classifier", "z": "N(0, I), no truncation", "seed": 0, **metrics}
        print(f"judged by digit_classifier: {metrics}")
    path = save_checkpoint(g_ema, args.name, config, training, out_dir=args.out_dir)
    print(f"saved {path}.*; wall time {wall:.1f} s, CPU time {time.process_time():.1f} s")


if __name__ == "__main__":
    main()
