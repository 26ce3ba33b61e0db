"""Judge generators with the digit classifier.

`python -m zoo.evaluate` prints, for the committed checkpoints: the classifier's
held-out accuracy, the conditional GAN's per-digit accuracy (does it draw the digit
it was asked for?) and the unconditional GAN's mean confidence and class histogram
(does it draw recognisable digits of every class, i.e. no mode collapse?).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from zoo.data import NUM_CLASSES, load_digit_images, train_test_split


@torch.no_grad()
def heldout_accuracy(classifier: nn.Module) -> float:
    """Accuracy on the held-out 20% of `train_test_split`, which the classifier never saw."""
    x, y = load_digit_images()
    _, test = train_test_split(len(y))
    test = torch.from_numpy(test)
    return (classifier.eval()(x[test]).argmax(1) == y[test]).float().mean().item()


def _within_class_std(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[num_classes]: per-pixel standard deviation within each class, averaged over pixels
    (nan for a class with fewer than two images)."""
    return torch.stack([images[labels == k].std(0).mean() for k in range(NUM_CLASSES)])


def diversity_ratio(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Within-class pixel spread of samples relative to the real digits (1.0 = as varied).

    Class accuracy alone rewards a generator that draws one template per digit
    (intra-class mode collapse); this ratio exposes it. Classes with under two
    samples are skipped.
    """
    x, y = load_digit_images()
    ratio = _within_class_std(images, labels) / _within_class_std(x, y)
    return ratio.nanmean().item()


def _latents(n: int, latent_dim: int, seed: int) -> torch.Tensor:
    """z ~ N(0, I) from a private generator: same seed, same samples, no global RNG side effects."""
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def class_accuracy(generator: nn.Module, classifier: nn.Module, samples_per_class: int = 100, seed: int = 0) -> dict:
    """Fraction of class-conditional samples the classifier assigns to the requested digit.

    z ~ N(0, I) without truncation, so the figure covers the whole latent space.
    Returns {"overall", "per_class": [float] * num_classes, "mean_max_prob", "diversity_ratio"}.
    """
    generator.eval(), classifier.eval()
    k = generator.num_classes
    labels = torch.arange(k).repeat_interleave(samples_per_class)
    images = generator(_latents(len(labels), generator.latent_dim, seed), labels)
    probs = classifier(images).softmax(1)
    hit = (probs.argmax(1) == labels).float().view(k, samples_per_class)
    return {
        "overall": hit.mean().item(),
        "per_class": [round(v, 4) for v in hit.mean(1).tolist()],
        "mean_max_prob": probs.max(1).values.mean().item(),
        "diversity_ratio": diversity_ratio(images, labels),
    }


@torch.no_grad()
def sample_statistics(generator: nn.Module, classifier: nn.Module, num_samples: int = 1000, seed: int = 0) -> dict:
    """For an unconditional generator: mean max softmax (recognisability), share of
    samples with max prob > 0.9, the histogram of predicted classes (coverage across
    digits) and the diversity ratio within predicted classes (variety within a digit)."""
    generator.eval(), classifier.eval()
    images = generator(_latents(num_samples, generator.latent_dim, seed))
    probs = classifier(images).softmax(1)
    top = probs.max(1).values
    return {
        "mean_max_prob": top.mean().item(),
        "frac_max_prob_above_0.9": (top > 0.9).float().mean().item(),
        "class_histogram": torch.bincount(probs.argmax(1), minlength=NUM_CLASSES).tolist(),
        "diversity_ratio": diversity_ratio(images, probs.argmax(1)),
    }


def judge(generator: nn.Module, classifier: nn.Module, seed: int = 0) -> dict:
    """The metric that fits the generator: class accuracy if conditional, else sample statistics."""
    if generator.num_classes > 0:
        return class_accuracy(generator, classifier, seed=seed)
    return sample_statistics(generator, classifier, seed=seed)


@torch.no_grad()
def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 10, scale: int = 2) -> None:
    """Writes [N, 1, H, W] images in [-1, 1] as one PNG grid (for eyeballing samples)."""
    from PIL import Image

    n, _, h, w = images.shape
    ncol = (n + nrow - 1) // nrow
    grid = np.zeros((ncol * (h + 2), nrow * (w + 2)), dtype=np.uint8)
    pixels = ((images[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = pixels[i]
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    from zoo.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-dir", help="also write sample grids <grid-dir>/<name>.png")
    args = parser.parse_args(argv)

    classifier = load_checkpoint("digit_classifier")
    print(f"digit_classifier held-out accuracy: {heldout_accuracy(classifier):.4f}")
    for name in ("cgan_digits", "dcgan_digits"):
        g = load_checkpoint(name)
        stats = judge(g, classifier, seed=args.seed)
        print(f"{name}:")
        for key, value in stats.items():
            print(f"  {key}: {value}")
        if args.grid_dir:
            z = _latents(100, g.latent_dim, args.seed)
            with torch.no_grad():
                images = g(z, torch.arange(10).repeat(10)) if g.num_classes else g(z)
            save_grid(images, Path(args.grid_dir) / f"{name}.png")


if __name__ == "__main__":
    main()
