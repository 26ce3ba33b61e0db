"""Judge the digit VAE: reconstructions of held-out digits and decoded N(0, I) samples.

    python -m zoo.vae.evaluate [--folder zoo/checkpoints/vae_digits] [--samples 1000] [--grid-dir DIR]

Reconstruction (the posterior mean decoded) of the 20% of digits that
`zoo.data.train_test_split` holds out, which the VAE never saw:
  - PSNR in 8-bit terms: both images quantised to 0..255 as a PNG would be, the squared
    error pooled over every pixel of the held-out set, 10 log10(255^2 / MSE);
  - the digit classifier's accuracy on the reconstructions (beside its accuracy on the
    originals: the reconstruction should keep the digit's identity).
Sampling (z ~ N(0, I) in the VAE's own latent space, decoded, as /v1/vae/sample does):
  - the classifier's mean max softmax, the share of samples above 0.9, the histogram of
    predicted classes (coverage: a VAE that draws only some digits shows gaps) and the
    within-class diversity ratio against the real digits (zoo.evaluate.diversity_ratio);
    the classifier's mean max softmax on the real held-out digits is the reference.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from zoo.data import NUM_CLASSES, load_digit_images, train_test_split
from zoo.evaluate import diversity_ratio, save_grid


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> the 0..255 integers a PNG would store (as float64 for arithmetic)."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().double()


def psnr_8bit(images: torch.Tensor, reference: torch.Tensor) -> float:
    """PSNR in dB of 8-bit-quantised images against the reference, squared error pooled
    over all pixels (per-image PSNRs would reward images that are mostly background)."""
    mse = (to_uint8(images) - to_uint8(reference)).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


def latent_shape(vae) -> tuple[int, int, int]:
    """(C_lat, h, w) at the VAE's native image size."""
    side = vae.config.sample_size
    side = side[0] if isinstance(side, (list, tuple)) else side
    h = side // 2 ** (len(vae.config.block_out_channels) - 1)
    return vae.config.latent_channels, h, h


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Decodes the posterior mean of each image (deterministic)."""
    out = [vae.decode(vae.encode(images[i : i + batch]).latent_dist.mean).sample
           for i in range(0, len(images), batch)]
    return torch.cat(out)


@torch.no_grad()
def sample(vae, n: int, seed: int = 0, batch: int = 256) -> torch.Tensor:
    """Decodes z ~ N(0, I) (the VAE's own latent space, no scaling_factor) from a private generator."""
    z = torch.randn(n, *latent_shape(vae), generator=torch.Generator().manual_seed(seed))
    return torch.cat([vae.decode(z[i : i + batch]).sample for i in range(0, n, batch)])


@torch.no_grad()
def reconstruction_figures(vae, classifier) -> dict:
    x, y = load_digit_images()
    _, test = train_test_split(len(y))
    test = torch.from_numpy(test)
    real, labels = x[test], y[test]
    rec = reconstruct(vae, real)
    classifier.eval()
    return {
        "heldout_images": len(test),
        "psnr_db": round(psnr_8bit(rec, real), 3),
        "classifier_accuracy_reconstructed": round((classifier(rec).argmax(1) == labels).float().mean().item(), 4),
        "classifier_accuracy_original": round((classifier(real).argmax(1) == labels).float().mean().item(), 4),
    }


@torch.no_grad()
def sample_figures(vae, classifier, n: int = 1000, seed: int = 0) -> dict:
    x, y = load_digit_images()
    _, test = train_test_split(len(y))
    classifier.eval()
    images = sample(vae, n, seed)
    probs = classifier(images).softmax(1)
    top, pred = probs.max(1)
    histogram = torch.bincount(pred, minlength=NUM_CLASSES).tolist()
    return {
        "samples": n,
        "seed": seed,
        "mean_max_prob": round(top.mean().item(), 4),
        "frac_max_prob_above_0.9": round((top > 0.9).float().mean().item(), 4),
        "class_histogram": histogram,
        "classes_with_at_least_2pct": sum(h >= 0.02 * n for h in histogram),
        "diversity_ratio": round(diversity_ratio(images, pred), 4),
        "reference_mean_max_prob_real_heldout": round(
            classifier(x[torch.from_numpy(test)]).softmax(1).max(1).values.mean().item(), 4),
    }


def figures(vae, classifier, samples: int = 1000, seed: int = 0) -> dict:
    return {"reconstruction": reconstruction_figures(vae, classifier),
            "sampling": sample_figures(vae, classifier, samples, seed)}


def main(argv: list[str] | None = None) -> None:
    from zoo.checkpoint import load_checkpoint
    from zoo.vae import CHECKPOINT, load_vae

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=str(CHECKPOINT))
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-dir", help="also write <dir>/vae_reconstructions.png and vae_samples.png")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    vae, classifier = load_vae(args.folder), load_checkpoint("digit_classifier")
    print(json.dumps(figures(vae, classifier, args.samples, args.seed), indent=2))
    if args.grid_dir:
        x, y = load_digit_images()
        _, test = train_test_split(len(y))
        real = x[torch.from_numpy(test[:50])]
        pairs = torch.stack([real, reconstruct(vae, real)], 1).flatten(0, 1)  # original, reconstruction, ...
        save_grid(pairs, Path(args.grid_dir) / "vae_reconstructions.png")
        save_grid(sample(vae, 100, args.seed), Path(args.grid_dir) / "vae_samples.png")


if __name__ == "__main__":
    main()
