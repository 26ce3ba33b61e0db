"""Train the tiny Stable-Diffusion-format digit model on CPU and save a diffusers folder.

    python -m zoo.latent_diffusion.train                 # -> zoo/checkpoints/sd_digits/
    python -m zoo.latent_diffusion.train --out /tmp/sd  # elsewhere

Two stages, as in latent diffusion: (1) a small AutoencoderKL (1-channel 32x32 <->
4x8x8 latents) trained alone, then frozen, and its latent std measured to set
`scaling_factor` (SD's 0.18215 is the same measurement for its VAE); (2) a CLIP
text encoder and a conditional U-Net trained jointly, from scratch, on the scaled
latents with the SD 1.x noise schedule, epsilon prediction and min-SNR weighting.
Captions are sampled per example from several phrasings, with ~12% empty captions
so classifier-free guidance has an unconditional branch. An EMA of the U-Net's and
text encoder's weights is what gets saved.

Why the auxiliary loss: a text encoder trained from scratch by the diffusion loss
alone collapses towards a caption-independent output (measured: after 1,500 steps
the U-Net's loss differed by < 2% between the right, a wrong and the empty caption,
and prompts drew the named digit 10-25% of the time), because
at first caption-dependent embeddings are only noise to the U-Net. A linear head
that names the digit from the mean of the text encoder's outputs (weight 0.1, not
saved) keeps the embeddings informative; the U-Net then learns to use them as fast
as it learns a class embedding.

Every random draw comes from one seeded torch.Generator (plus torch.manual_seed for
the initial weights), so a run is byte-for-byte reproducible on the same machine
and thread count. One thread by default: on a shared 2-core machine, two OpenMP
threads made each step 3 to 30 times slower (measured) as they wait on each other.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.data import load_digit_images
from zoo.latent_diffusion import CHECKPOINT
from zoo.latent_diffusion.captions import all_captions, sample_captions
from zoo.latent_diffusion.tokenizer import BOS, EOS, MODEL_MAX_LENGTH, write_tokenizer

# SD 1.x's noise schedule, for training (DDPM) and sampling (the saved DDIM scheduler).
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
TEXT_HIDDEN = 64


def build_vae():
    """1-channel 32x32 <-> 4x8x8: three blocks, two downsamplings, scale factor 4."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=32,
    )


def build_text_encoder(vocab: dict[str, int]):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=TEXT_HIDDEN,
            intermediate_size=4 * TEXT_HIDDEN,
            projection_dim=TEXT_HIDDEN,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MODEL_MAX_LENGTH,
            bos_token_id=vocab[BOS],
            eos_token_id=vocab[EOS],
            pad_token_id=vocab[EOS],
        )
    )


def build_unet(block_out_channels=(32, 64)):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 0: a multiplier for LambdaLR."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p, 1.0 - decay)


def batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless seeded shuffles of range(n), cut into batches."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


def train_vae(x: torch.Tensor, args, gen: torch.Generator, start: float):
    """MSE reconstruction + a small KL term (per-pixel normalised) keeps latents smooth."""
    vae = build_vae()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.vae_steps, 50))
    it = batches(len(x), args.vae_batch_size, gen)
    for step in range(1, args.vae_steps + 1):
        real = x[next(it)]
        post = vae.encode(real).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, real)
        kl = post.kl().mean() / real[0].numel()
        loss = mse + args.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.vae_steps:
            print(f"vae   step {step:5d}  mse {mse.item():.4f}  kl/px {kl.item():.3f}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode(vae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (the VAE is frozen from here on)."""
    means, stds = [], []
    for i in range(0, len(x), 256):
        post = vae.encode(x[i : i + 256]).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


def train_denoiser(mean, std, labels, tokenizer, vocab, args, gen, start):
    """Text encoder + U-Net, jointly, on epsilon prediction with min-SNR weighting."""
    from diffusers import DDPMScheduler

    noise_sched = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    alphas = noise_sched.alphas_cumprod
    snr = alphas / (1 - alphas)
    # Min-SNR-gamma (Hang et al. 2023): down-weights the easy low-noise steps; converges faster.
    weight = snr.clamp(max=args.snr_gamma) / snr if args.snr_gamma > 0 else torch.ones_like(snr)

    text_encoder, unet = build_text_encoder(vocab), build_unet(args.unet_channels)
    # Auxiliary head (not saved): names the digit from the mean of the text encoder's outputs.
    aux_head = nn.Linear(TEXT_HIDDEN, 10)
    params = list(text_encoder.parameters()) + list(unet.parameters()) + list(aux_head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, args.steps, args.warmup))
    ema_te, ema_unet = copy.deepcopy(text_encoder), copy.deepcopy(unet)

    id_cache: dict[str, torch.Tensor] = {}

    def ids_for(captions: list[str]) -> torch.Tensor:
        for c in set(captions) - id_cache.keys():
            id_cache[c] = tokenizer(c, padding="max_length", max_length=MODEL_MAX_LENGTH,
                                    truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([id_cache[c] for c in captions])

    it = batches(len(mean), args.batch_size, gen)
    running = 0.0
    for step in range(1, args.steps + 1):
        idx = next(it)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * args.scaling
        captions = sample_captions(labels[idx], gen, dropout=args.caption_dropout)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, SCHEDULER_CONFIG["num_train_timesteps"], (len(idx),), generator=gen)
        noisy = noise_sched.add_noise(latents, noise, t)
        text = text_encoder(ids_for(captions))[0]
        pred = unet(noisy, t, text).sample
        loss = (weight[t] * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        named = torch.tensor([c != "" for c in captions])
        if args.text_aux_weight > 0 and named.any():
            ce = F.cross_entropy(aux_head(text[named].mean(dim=1)), labels[idx][named])
            total = loss + args.text_aux_weight * ce
        else:
            total = loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        ema_update(ema_te, text_encoder, decay)
        ema_update(ema_unet, unet, decay)
        running += loss.item()
        if step % 100 == 0 or step == args.steps:
            print(f"unet  step {step:5d}  loss {running / (100 if step % 100 == 0 else step % 100):.4f}  "
                  f"lr {sched.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f} s", flush=True)
            running = 0.0
    return ema_te.eval(), ema_unet.eval()


def sd_text_encoder_keys(path: Path) -> None:
    """Rewrites CLIPTextModel weights with SD 1.x's "text_model." key prefix.

    transformers 5 saves them without it; transformers 4 (and tools that read SD
    checkpoints by key) need it, and transformers 5 loads either layout.
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    state = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in state.items()}
    save_file(state, str(path), metadata={"format": "pt"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CHECKPOINT))
    parser.add_argument("--vae-steps", type=int, default=300)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-3, help="x KL per pixel")
    parser.add_argument("--steps", type=int, default=1000, help="U-Net/text-encoder updates")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--text-aux-weight", type=float, default=0.1,
                        help="weight of the auxiliary digit-from-text loss (0 disables)")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--unet-channels", type=int, nargs=2, default=[32, 64])
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--snr-gamma", type=float, default=5.0, help="0 disables min-SNR weighting")
    parser.add_argument("--caption-dropout", type=float, default=0.12)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (at most 2 here); 1 is fastest on a shared 2-core box")
    parser.add_argument("--vae-from", help="reuse the trained VAE of this diffusers folder (skip stage 1)")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    out = Path(args.out)

    x, y = load_digit_images()  # all 1,797 images, as the GANs use
    tokenizer = write_tokenizer(out / "tokenizer", all_captions())
    vocab = tokenizer.get_vocab()

    if args.vae_from:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(Path(args.vae_from) / "vae").eval().requires_grad_(False)
    else:
        vae = train_vae(x, args, gen, start)
    mean, std = encode(vae, x)
    # SD's recipe: scale latents to unit variance (its 0.18215 = 1 / std of its VAE's latents).
    args.scaling = round(1.0 / mean.std().item(), 5)
    vae.register_to_config(scaling_factor=args.scaling)
    print(f"latents: mean {mean.mean().item():.3f} std {mean.std().item():.3f} "
          f"posterior std {std.mean().item():.4f} -> scaling_factor {args.scaling}", flush=True)

    text_encoder, unet = train_denoiser(mean, std, y, tokenizer, vocab, args, gen, start)

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER_CONFIG),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # save_pretrained re-serialises the tokenizer; rewrite our canonical files (same
    # vocab/merges, plus tokenizer.json's padding/truncation for the serving side).
    assert write_tokenizer(out / "tokenizer", all_captions()).get_vocab() == vocab
    sd_text_encoder_keys(out / "text_encoder" / "model.safetensors")
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    training = {k: v for k, v in vars(args).items() if k != "out"}
    training.update(wall_seconds=round(wall, 1), cpu_seconds=round(cpu, 1),
                    data="sklearn digits 32x32, all 1,797 images",
                    torch=torch.__version__, diffusers=diffusers.__version__,
                    transformers=transformers.__version__)
    (out / "training.json").write_text(json.dumps(training, indent=2) + "\n")
    print(f"saved {out}  total wall time {wall:.0f} s (CPU {cpu:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
