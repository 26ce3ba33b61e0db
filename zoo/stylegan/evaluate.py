"""Figures for the StyleGAN demo: per-digit accuracy, variety, style mixing.

    .venv/bin/python -m zoo.stylegan.evaluate [--checkpoint STEM] [--grid PATH.png]

- class accuracy: the committed digit classifier's verdict on 100 samples per digit,
  z ~ N(0, I), truncation_psi 1 (the whole latent space), with the within-class pixel
  spread relative to the real digits (zoo.evaluate.diversity_ratio; 1.0 = as varied).
- style mixing: for pairs (seed A, class a) / (seed B, class b != a), the image from
  ws[:crossover] of A and ws[crossover:] of B; the share still classified as a, for
  every crossover 0..num_ws (0 = all B's styles: ~0 expected; num_ws = all A's: ~1).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from zoo.data import NUM_CLASSES
from zoo.evaluate import diversity_ratio


def load_classifier():
    from zoo.checkpoint import load_checkpoint

    return load_checkpoint("digit_classifier")


def _z(n: int, z_dim: int, seed: int) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def class_accuracy(g, classifier, samples_per_class: int = 100, seed: int = 0, truncation_psi: float = 1.0) -> dict:
    g.eval(), classifier.eval()
    labels = torch.arange(g.c_dim).repeat_interleave(samples_per_class)
    c = F.one_hot(labels, g.c_dim).float()
    images = g.synthesis(g.mapping(_z(len(labels), g.z_dim, seed), c, truncation_psi=truncation_psi))
    probs = classifier(images).softmax(1)
    hit = (probs.argmax(1) == labels).float().view(g.c_dim, samples_per_class)
    return {
        "overall": round(hit.mean().item(), 4),
        "per_class": [round(v, 4) for v in hit.mean(1).tolist()],
        "mean_max_prob": round(probs.max(1).values.mean().item(), 4),
        "diversity_ratio": round(diversity_ratio(images, labels), 4),
    }


@torch.no_grad()
def mixing_curve(g, classifier, pairs: int = 500, seed: int = 1) -> list[float]:
    """[num_ws + 1]: share of mixed images classified as the coarse source's class a."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, NUM_CLASSES, (pairs,), generator=gen)
    b = (a + torch.randint(1, NUM_CLASSES, (pairs,), generator=gen)) % NUM_CLASSES  # b != a
    ws_a = g.mapping(torch.randn(pairs, g.z_dim, generator=gen), F.one_hot(a, g.c_dim).float())
    ws_b = g.mapping(torch.randn(pairs, g.z_dim, generator=gen), F.one_hot(b, g.c_dim).float())
    curve = []
    for crossover in range(g.num_ws + 1):
        ws = torch.cat([ws_a[:, :crossover], ws_b[:, crossover:]], dim=1)
        curve.append(round((classifier(g.synthesis(ws)).argmax(1) == a).float().mean().item(), 4))
    return curve


def main(argv: list[str] | None = None) -> None:
    from zoo.stylegan.model import DEFAULT_CHECKPOINT, load_stylegan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", help="write a 10x10 sample grid PNG (a column per digit)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    g, classifier = load_stylegan(args.checkpoint), load_classifier()
    print(f"stylegan_digits: z_dim {g.z_dim}, c_dim {g.c_dim}, w_dim {g.w_dim}, num_ws {g.num_ws}, "
          f"{g.img_channels}x{g.img_resolution}x{g.img_resolution}, "
          f"{sum(p.numel() for p in g.parameters()):,} parameters")
    for psi in (1.0, 0.7):
        stats = class_accuracy(g, classifier, seed=args.seed, truncation_psi=psi)
        print(f"truncation_psi {psi}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
    curve = mixing_curve(g, classifier)
    print("style mixing, share keeping the coarse source's class a, by crossover 0.."
          f"{g.num_ws}: {curve}")
    if args.grid:
        from zoo.evaluate import save_grid

        with torch.no_grad():
            labels = torch.arange(10).repeat(10)
            images = g(_z(100, g.z_dim, args.seed), F.one_hot(labels, g.c_dim).float())
        save_grid(images, args.grid)


if __name__ == "__main__":
    main()
