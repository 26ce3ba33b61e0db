"""Train the edges2digits Pix2Pix translator on CPU (a few minutes).

    nice .venv/bin/python -m zoo.translator.train [--steps 1500] [--out PATH.safetensors]

Pix2Pix's objective (Isola et al. 2017, eq. 4): G minimises the conditional GAN loss
(the PatchGAN discriminator D sees the sketch beside a real or generated digit) plus
lambda = 100 times the L1 distance to the real digit; D minimises the usual binary
cross-entropy, halved (the paper's "divide the objective by 2 while optimizing D").
Adam, lr 2e-4, betas (0.5, 0.999), batch 64, on the training 80% of the digits; the
held-out 20% are what zoo.translator.evaluate measures, and the figures go into the
.json beside the weights. Seeded: torch.manual_seed and one torch.Generator.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.translator import CHECKPOINT
from zoo.translator.data import edges2digits
from zoo.translator.evaluate import evaluate
from zoo.translator.model import PatchDiscriminator, UnetGenerator

CONFIG = {"in_channels": 1, "out_channels": 1, "ngf": 32, "depth": 3}
L1_WEIGHT = 100.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    sketches, digits, _ = edges2digits()["train"]
    g, d = UnetGenerator(**CONFIG), PatchDiscriminator(CONFIG["in_channels"] + CONFIG["out_channels"])
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = F.binary_cross_entropy_with_logits
    start = time.perf_counter()
    for step in range(args.steps):
        idx = torch.randint(len(sketches), (args.batch,), generator=gen)
        a, b = sketches[idx], digits[idx]
        fake = g(a)
        # D: real pairs -> 1, generated pairs -> 0.
        real_logits, fake_logits = d(a, b), d(a, fake.detach())
        loss_d = 0.5 * (bce(real_logits, torch.ones_like(real_logits))
                        + bce(fake_logits, torch.zeros_like(fake_logits)))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # G: fool D, stay close to the target.
        logits = d(a, fake)
        loss_gan, loss_l1 = bce(logits, torch.ones_like(logits)), (fake - b).abs().mean()
        loss_g = loss_gan + L1_WEIGHT * loss_l1
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  D {loss_d.item():.3f}  G_gan {loss_gan.item():.3f}  L1 {loss_l1.item():.4f}  "
                  f"{time.perf_counter() - start:5.0f}s", flush=True)
    seconds = time.perf_counter() - start
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in g.state_dict().items()}, str(args.out))
    metrics = evaluate(g)
    meta = {"architecture": "UnetGenerator (Pix2Pix)", "module": "zoo/translator/model.py:UnetGenerator",
            "config": CONFIG, "size_multiple": 2 ** CONFIG["depth"],
            "parameters": sum(t.numel() for t in g.parameters()),
            "training": {"steps": args.steps, "batch": args.batch, "seed": args.seed, "threads": args.threads,
                         "l1_weight": L1_WEIGHT, "train_seconds": round(seconds, 1),
                         "task": "edges2digits: |Sobel| > 0.35 outline -> digit, zoo.data split"},
            "held_out": metrics}
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
