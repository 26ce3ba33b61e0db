"""What the edges2digits translator learned, on the held-out 20% of the digits:

- the committed digit classifier's accuracy on the sketches as they are, on the
  translated sketches, and on the real digits (the ceiling);
- PSNR of the translation against the real digit, and of the sketch itself (the
  baseline: the input already is a picture of the digit's outline).

    .venv/bin/python -m zoo.translator.evaluate [--weights PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from zoo.translator import CHECKPOINT
from zoo.translator.data import edges2digits


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a - b) / 2).pow(2).mean(dim=(1, 2, 3))  # [-1, 1] -> [0, 1] units
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def load_generator(weights: Path = CHECKPOINT):
    from safetensors.torch import load_file

    from zoo.translator.model import UnetGenerator

    meta = json.loads(weights.with_suffix(".json").read_text())
    g = UnetGenerator(**meta["config"])
    g.load_state_dict(load_file(str(weights)))
    return g.eval()


@torch.no_grad()
def evaluate(generator) -> dict:
    from zoo.checkpoint import load_checkpoint

    classifier = load_checkpoint("digit_classifier").eval()
    sketches, digits, labels = edges2digits()["test"]
    generator.eval()
    translated = generator(sketches).clamp(-1, 1)
    acc = lambda x: round(float((classifier(x).argmax(1) == labels).float().mean()), 4)  # noqa: E731
    return {"held_out_digits": len(labels), "accuracy_sketch": acc(sketches), "accuracy_translated": acc(translated),
            "accuracy_real": acc(digits), "psnr_sketch_db": round(psnr(sketches, digits), 3),
            "psnr_translated_db": round(psnr(translated, digits), 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=CHECKPOINT)
    args = p.parse_args(argv)
    print(json.dumps(evaluate(load_generator(args.weights)), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
