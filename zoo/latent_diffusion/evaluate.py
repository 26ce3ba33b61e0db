"""Judge the text-to-image model with the digit classifier.

    python -m zoo.latent_diffusion.evaluate [--per-digit 20] [--guidance 1 3 5 7.5]

For every digit 0-9 and several phrasings ("a handwritten digit seven", "the number
7", ...), generates images with the pipeline's DDIM scheduler and reports, per
guidance scale, the fraction the committed digit classifier assigns to the digit
the prompt named. Guidance 1 means no classifier-free guidance (diffusers then
skips the unconditional branch). Optionally writes a PNG grid (one row per digit).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from zoo.latent_diffusion import CHECKPOINT, load_pipeline
from zoo.latent_diffusion.captions import EVAL_TEMPLATES, caption


def prompts_for(per_digit: int, templates=EVAL_TEMPLATES) -> tuple[list[str], np.ndarray]:
    """per_digit prompts for each digit, cycling through the phrasings; and the digits."""
    digits = np.repeat(np.arange(10), per_digit)
    prompts = [caption(int(d), templates[i % len(templates)]) for d in range(10) for i in range(per_digit)]
    return prompts, digits


def to_classifier_input(images: np.ndarray) -> np.ndarray:
    """diffusers' output_type="np" ([N, 32, 32, 1] in [0, 1]) -> [N, 1, 32, 32] in [-1, 1]."""
    return images.transpose(0, 3, 1, 2).astype(np.float32) * 2.0 - 1.0


@torch.no_grad()
def generate(pipe, prompts: list[str], guidance: float, steps: int, seed: int, batch: int = 100) -> np.ndarray:
    """[N, 32, 32, 1] in [0, 1]; a seeded generator per chunk, so results do not depend on
    what else was generated before."""
    out = []
    for i in range(0, len(prompts), batch):
        gen = torch.Generator().manual_seed(seed + i)
        out.append(pipe(prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                        generator=gen, output_type="np").images)
    return np.concatenate(out)


@torch.no_grad()
def digit_accuracy(pipe, classifier, guidance: float, per_digit: int = 20, steps: int = 20,
                   seed: int = 0) -> dict:
    """{"accuracy", "per_digit" [10], "confidence" (mean softmax of the requested digit), "images"}."""
    prompts, digits = prompts_for(per_digit)
    images = generate(pipe, prompts, guidance, steps, seed)
    probs = classifier(torch.from_numpy(to_classifier_input(images))).softmax(1).numpy()
    hit = probs.argmax(1) == digits
    return {
        "accuracy": float(hit.mean()),
        "per_digit": [float(v) for v in hit.reshape(10, per_digit).mean(1)],
        "confidence": float(probs[np.arange(len(digits)), digits].mean()),
        "images": images,
    }


def save_grid(images: np.ndarray, rows: int, path: str, scale: int = 2) -> None:
    """Images [N, H, W, 1] in [0, 1] -> a rows x (N / rows) PNG grid with 2 px gaps."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = n // rows
    grid = np.ones((rows * (h + 2), cols * (w + 2)), np.float32)
    for k in range(rows * cols):
        r, c = divmod(k, cols)
        grid[r * (h + 2) : r * (h + 2) + h, c * (w + 2) : c * (w + 2) + w] = images[k, :, :, 0]
    img = Image.fromarray((grid * 255).round().astype(np.uint8), mode="L")
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(CHECKPOINT))
    parser.add_argument("--per-digit", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0, 7.5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--grid", help="write a PNG grid per guidance scale: <grid>_g<scale>.png")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from zoo.checkpoint import load_checkpoint

    pipe = load_pipeline(args.model)
    classifier = load_checkpoint("digit_classifier")
    table = {}
    print(f"{'guidance':>8}  {'accuracy':>8}  {'conf':>5}  per digit 0..9   ({args.per_digit}/digit, "
          f"DDIM {args.steps} steps)")
    for g in args.guidance:
        t0 = time.perf_counter()
        r = digit_accuracy(pipe, classifier, g, args.per_digit, args.steps, args.seed)
        table[g] = {k: v for k, v in r.items() if k != "images"}
        per = " ".join(f"{v:.2f}" for v in r["per_digit"])
        print(f"{g:8.1f}  {r['accuracy']:8.3f}  {r['confidence']:5.2f}  {per}  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.grid:
            save_grid(r["images"], 10, f"{args.grid}_g{g:g}.png")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "per_digit": args.per_digit, "steps": args.steps,
                       "seed": args.seed, "results": table}, f, indent=2)


if __name__ == "__main__":
    main()
