"""Train the demo class-conditional StyleGAN-like generator on the digits.

    .venv/bin/python -m zoo.stylegan.train            # -> zoo/checkpoints/stylegan_digits.*

Recipe: the recipe that trains zoo/train_gan.py's cGAN on 1,797 digits in a few CPU
minutes, with a StyleGAN generator: hinge loss, the spectral-norm projection
discriminator with a minibatch-stddev channel from zoo/gan.py, one D step per G step,
Adam(betas (0, 0.99)), the mapping network at 0.1x the learning rate (NVIDIA uses 0.01x
with equalised learning rates; with plain Adam 0.1x keeps w stable without stalling it),
style-mixing regularisation (prob 0.5: two z of the same class, a random crossover, as
NVIDIA's style_mixing_prob) and an EMA of G's weights (what gets saved; w_avg travels
with it). Seeded: the same command gives the same checkpoint on the same machine.

Committed run (2,000 steps, 385 s wall / 737 s CPU on 2 shared cores): the classifier
recognises 100% of samples as the asked digit, but within-class variety is low (pixel
spread 0.09x the real digits'; 0.25 at step 400, falling as training goes on): this G
draws close to one template per digit, unlike zoo/train_gan.py's cGAN (0.79). Tried
and not better: mapping at 1x the learning rate (0.09 at step 250); a mode-seeking term
(MSGAN, weight 1.0 and 0.2) broke training (accuracy ~0.1 at step 400). Open work.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zoo.data import NUM_CLASSES, load_digit_images
from zoo.gan import Discriminator, hinge_d_loss, hinge_g_loss
from zoo.stylegan.model import DEFAULT_CHECKPOINT, StyleGANGenerator, save_stylegan

CONFIG = {"z_dim": 64, "c_dim": NUM_CLASSES, "w_dim": 128, "img_resolution": 32, "img_channels": 1,
          "channels": {"4": 128, "8": 128, "16": 64, "32": 32}, "mapping_layers": 4,
          "class_names": [str(k) for k in range(NUM_CLASSES)]}


def generate(g: StyleGANGenerator, z: torch.Tensor, labels: torch.Tensor, mixing_prob: float,
             gen: torch.Generator, update_emas: bool = False) -> torch.Tensor:
    c = F.one_hot(labels, g.c_dim).float()
    ws = g.mapping(z, c, update_emas=update_emas)
    if mixing_prob > 0:
        z2 = torch.randn(z.shape, generator=gen)
        ws2 = g.mapping(z2, c)
        cutoff = int(torch.randint(1, g.num_ws, (), generator=gen))
        mix = (torch.rand(len(z), generator=gen) < mixing_prob)[:, None, None]
        layer = (torch.arange(g.num_ws) >= cutoff)[None, :, None]
        ws = torch.where(mix & layer, ws2, ws)
    return g.synthesis(ws)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3 / 5)
    parser.add_argument("--mapping-lr-mult", type=float, default=0.1)
    parser.add_argument("--mixing-prob", type=float, default=0.5)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--eval-every", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT, help="checkpoint stem")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    x, y = load_digit_images()
    g = StyleGANGenerator(**CONFIG)
    d = Discriminator(NUM_CLASSES, 1, base_channels=32)
    g_ema = copy.deepcopy(g).eval()
    opt_g = torch.optim.Adam([
        {"params": g.synthesis.parameters(), "lr": args.lr},
        {"params": g.mapping.parameters(), "lr": args.lr * args.mapping_lr_mult}], betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d.parameters(), lr=args.lr, betas=(0.0, 0.99))

    order, pos = torch.randperm(len(y), generator=gen), 0
    for step in range(1, args.steps + 1):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(y), generator=gen), 0
        idx = order[pos: pos + args.batch_size]
        pos += args.batch_size
        real, labels = x[idx], y[idx]
        z = torch.randn(len(idx), g.z_dim, generator=gen)
        fake = generate(g, z, labels, args.mixing_prob, gen, update_emas=True)
        loss_d = hinge_d_loss(d(real, labels), d(fake.detach(), labels))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = hinge_g_loss(d(fake, labels))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(g_ema.parameters(), g.parameters()):
                p_ema.lerp_(p, 1.0 - decay)
            g_ema.mapping.w_avg.copy_(g.mapping.w_avg)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step:5d}  loss_d {loss_d.item():.3f}  loss_g {loss_g.item():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            from zoo.stylegan.evaluate import class_accuracy, load_classifier

            stats = class_accuracy(g_ema, load_classifier(), samples_per_class=50)
            print(f"  accuracy {stats['overall']:.3f} diversity {stats['diversity_ratio']:.3f}", flush=True)

    wall = time.perf_counter() - start
    from zoo.stylegan.evaluate import class_accuracy, load_classifier

    stats = class_accuracy(g_ema, load_classifier())
    training = {
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
        "data": "sklearn digits 32x32, all 1,797 images",
        "recipe": f"hinge loss, spectral-norm projection discriminator with minibatch stddev (zoo/gan.py), "
                  f"Adam lr {args.lr:g} (mapping x{args.mapping_lr_mult:g}) betas (0, 0.99), style mixing "
                  f"prob {args.mixing_prob:g} within a class, EMA {args.ema_decay:g} of G, w_avg beta 0.995",
        "wall_seconds": round(wall, 1), "cpu_seconds": round(time.process_time(), 1),
        "metrics": {"judged_by": "digit_classifier", "truncation_psi": 1.0, "seed": 0, **stats},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_stylegan(g_ema, args.out, CONFIG, training)
    print(f"judged by digit_classifier: {stats}")
    print(f"saved {args.out}.*; wall {wall:.1f} s, CPU {time.process_time():.1f} s")


if __name__ == "__main__":
    main()
