"""Judge the class-conditional pixel DDPM with the digit classifier.

    python -m zoo.ddpm.evaluate [--per-digit 10] [--steps 20] [--seed 0] [--grid out.png]

For each digit 0-9, samples `per_digit` images conditioned on that digit with a DDIM
scheduler built from the folder's own config (`DDIMScheduler.from_config`, eta 0,
20 steps by default) and reports the fraction the committed digit classifier assigns
to the requested digit, per digit and overall, and its mean confidence.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from zoo.ddpm import CHECKPOINT, load_scheduler_config, load_unet, sample


def ddim(config: dict):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(config)


@torch.no_grad()
def digit_accuracy(unet, scheduler_config: dict, classifier, per_digit: int = 10, steps: int = 20,
                   seed: int = 0) -> dict:
    """{"accuracy", "per_digit" [10], "confidence", "images" [N, 1, 32, 32] in [-1, 1]};
    images are ordered digit by digit (per_digit of 0, then of 1, ...)."""
    labels = torch.arange(10).repeat_interleave(per_digit)
    images = sample(unet.eval(), labels, ddim(scheduler_config), steps=steps, seed=seed)
    probs = classifier.eval()(images).softmax(1)
    hit = (probs.argmax(1) == labels).float()
    return {
        "accuracy": round(hit.mean().item(), 4),
        "per_digit": [round(v, 4) for v in hit.view(10, per_digit).mean(1).tolist()],
        "confidence": round(probs[torch.arange(len(labels)), labels].mean().item(), 4),
        "images": images,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--per-digit", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (eta 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", help="write a PNG grid here (one row per digit)")
    parser.add_argument("--json", help="also write the figures as JSON here")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    from zoo.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    r = digit_accuracy(load_unet(args.model), load_scheduler_config(args.model), load_checkpoint("digit_classifier"),
                       args.per_digit, args.steps, args.seed)
    wall = time.perf_counter() - t0
    print(f"{args.model}: DDIM {args.steps} steps (eta 0), {args.per_digit} samples per digit, seed {args.seed}")
    print(f"  accuracy {r['accuracy']:.3f}  confidence {r['confidence']:.3f}  ({wall:.0f} s)")
    print("  per digit: " + "  ".join(f"{d}:{v:.2f}" for d, v in enumerate(r["per_digit"])))
    from zoo.evaluate import diversity_ratio

    r["diversity_ratio"] = round(diversity_ratio(r["images"], torch.arange(10).repeat_interleave(args.per_digit)), 4)
    print(f"  diversity ratio (within-digit pixel spread / the real digits'): {r['diversity_ratio']:.3f}")
    if args.grid:
        from zoo.evaluate import save_grid

        save_grid(r["images"], args.grid, nrow=args.per_digit)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "steps": args.steps, "per_digit_samples": args.per_digit,
                       "seed": args.seed, **{k: v for k, v in r.items() if k != "images"}}, f, indent=2)
    return r


if __name__ == "__main__":
    main()
