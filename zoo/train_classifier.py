"""Train the digit classifier: `python -m zoo.train_classifier [--seed 0] [--epochs 30]`.

Trains on the train part of `train_test_split`, reports accuracy on the held-out
part, and saves zoo/checkpoints/digit_classifier.{safetensors,json}.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from zoo.checkpoint import save_checkpoint
from zoo.classifier import DigitClassifier
from zoo.data import load_digit_images, train_test_split
from zoo.evaluate import heldout_accuracy


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translates each image by up to +-max_shift pixels, filling with background (-1).

    Generated digits are not centred as exactly as the scanned ones; a classifier
    that has seen shifted digits judges them on shape, not position.
    """
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--name", default="digit_classifier")
    parser.add_argument("--out-dir", help="default: zoo/checkpoints")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)  # fixes data order and augmentation
    start = time.perf_counter()

    x, y = load_digit_images()
    train, _ = train_test_split(len(y))
    x_train, y_train = x[train], y[train]
    config = {"num_classes": 10, "image_channels": 1, "base_channels": 32}
    model = DigitClassifier(**config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps_per_epoch = (len(y_train) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.epochs * steps_per_epoch)

    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        total = 0.0
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            loss = F.cross_entropy(model(random_shift(x_train[idx], 2, gen)), y_train[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            print(f"epoch {epoch + 1:3d}  loss {total / len(y_train):.4f}  "
                  f"held-out acc {heldout_accuracy(model):.4f}", flush=True)

    acc = heldout_accuracy(model.eval())
    wall = time.perf_counter() - start
    training = {
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "data": "sklearn digits 32x32, train split of zoo.data.train_test_split",
        "augmentation": "random shift +-2 px",
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(time.process_time(), 1),
        "metrics": {"heldout_accuracy": round(acc, 4)},
    }
    path = save_checkpoint(model, args.name, config, training, out_dir=args.out_dir)
    print(f"held-out accuracy {acc:.4f}; saved {path}.*; wall time {wall:.1f} s")


if __name__ == "__main__":
    main()
