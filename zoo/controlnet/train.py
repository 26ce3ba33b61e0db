"""Train the digits ControlNet on CPU (a few minutes): outline -> digit, for sd_digits.

    python -m zoo.controlnet.train [--steps 1500] [--out DIR]

The ControlNet starts as a copy of sd_digits' U-Net encoder (diffusers' ControlNetModel.from_unet,
zero convolutions at zero) with a conditioning embedding that downsamples the 32x32 control
image by the VAE's factor 4; the U-Net, VAE and text encoder stay frozen. Every example is
captioned with the empty prompt, so the digit's identity can only come from the outline.
Loss: the frozen U-Net's epsilon error with the ControlNet's residuals added, on the
edges2digits training split (zoo.data's). One seeded generator; one thread (see
zoo/latent_diffusion/train.py on why).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from zoo.controlnet import CHECKPOINT, control_images
from zoo.latent_diffusion import CHECKPOINT as SD_FOLDER
from zoo.translator.data import edges2digits


def empty_prompt_embedding(folder: Path) -> torch.Tensor:
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return encoder(ids)[0]


def main(argv=None) -> int:
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel

    import export  # noqa: F401 - diffusers finds torchvision importable

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=CHECKPOINT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    unet = UNet2DConditionModel.from_pretrained(SD_FOLDER / "unet").eval().requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(SD_FOLDER / "vae").eval().requires_grad_(False)
    noise_scheduler = DDPMScheduler.from_pretrained(SD_FOLDER / "scheduler")
    levels = len(vae.config.block_out_channels)  # the conditioning embedding downsamples as the VAE
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 32)[:levels])
    controlnet.train()

    sketches, digits, _ = edges2digits()["train"]
    control = control_images(sketches)
    with torch.no_grad():
        posterior = vae.encode(digits).latent_dist
        mean, std = posterior.mean, posterior.std
    text = empty_prompt_embedding(SD_FOLDER)
    alphas = noise_scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=args.lr, weight_decay=0.0)
    start, losses = time.time(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(digits), (args.batch,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (args.batch,), generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        ehs = text.expand(args.batch, -1, -1)
        down, mid = controlnet(noisy, t, ehs, control[idx], return_dict=False)
        pred = unet(noisy, t, ehs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0:
            print(f"step {step + 1}/{args.steps} loss {sum(losses[-100:]) / 100:.4f} ({time.time() - start:.0f}s)",
                  flush=True)
    controlnet.eval()
    controlnet.save_pretrained(args.out)
    (args.out / "training.json").write_text(json.dumps({
        "task": "edges2digits outline (|Sobel| > 0.35, zoo/translator/data.py) -> digit, empty prompt, zoo.data split",
        "base": "zoo/checkpoints/sd_digits", "steps": args.steps, "batch": args.batch, "lr": args.lr,
        "seed": args.seed, "final_loss_last_100": sum(losses[-100:]) / min(100, len(losses)),
        "seconds": round(time.time() - start)}, indent=2))
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
