"""What a DeepCache shallow step costs against a full one on real U-Net architectures.

    .venv/bin/python bench/bench_deepcache_architectures.py --latent 32 --repeats 3

The demo U-Net has two levels, and most of its work is at the shallowest one, so DeepCache
saves it little. Production U-Nets put most of theirs in the deeper levels. This builds
U-Nets with the published block layouts of SD 1.5 (`UNet2DConditionModel()`'s defaults with 768-wide text) and,
with `--sdxl`, SDXL base (random weights: the cost does not depend on them; nothing is
downloaded), and times, in PyTorch on this CPU, the full U-Net against the shallow step
export/deepcache.py exports (`shallow_forward`), at batch 2 (one guided image) and
`--latent` x `--latent` latents. Best of `--repeats`, calls alternating. The ratio bounds
DeepCache's speed-up at interval N: N / (1 + (N - 1) * shallow/full).
Appends the table with the command to bench/results/deepcache.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export  # noqa: E402,F401 - first: diffusers finds torchvision importable
from bench.report import append_report  # noqa: E402
from export.deepcache import shallow_forward  # noqa: E402

SDXL = dict(  # stable-diffusion-xl-base-1.0's unet/config.json, the fields that differ from the defaults
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32, help="latent side (64 = SD 1.5's native 512 px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sdxl", action="store_true", help="also SDXL base (about 10 GB of fp32 weights)")
    parser.add_argument("--note", default="", help="the machine's state")
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    layouts = [("SD 1.5", {"cross_attention_dim": 768}, 768, None)]
    if args.sdxl:
        layouts.append(("SDXL base", SDXL, 2048, (1280, 6)))
    rows = []
    for name, config, context, added in layouts:
        unet = UNet2DConditionModel(**config).eval()
        b, s = 2, args.latent
        sample = torch.randn(b, 4, s, s)
        t = torch.tensor([500.0, 500.0])
        text = torch.randn(b, 77, context)
        cond = None if added is None else {"text_embeds": torch.randn(b, added[0]),
                                           "time_ids": torch.randn(b, added[1])}
        captured = {}
        hook = unet.up_blocks[-1].register_forward_pre_hook(
            lambda _m, _a, kw, captured=captured: captured.update(features=kw["hidden_states"]), with_kwargs=True)
        with torch.no_grad():
            unet(sample, t, text, added_cond_kwargs=cond)
        hook.remove()
        full_s, shallow_s = float("inf"), float("inf")
        with torch.no_grad():
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                unet(sample, t, text, added_cond_kwargs=cond)
                full_s = min(full_s, time.perf_counter() - t0)
                t0 = time.perf_counter()
                shallow_forward(unet, sample, t, text, captured["features"], cond)
                shallow_s = min(shallow_s, time.perf_counter() - t0)
        ratio = shallow_s / full_s
        bounds = " | ".join(f"{n / (1 + (n - 1) * ratio):.2f}" for n in (2, 3, 5))
        rows.append(f"| {name} | {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M | {1000 * full_s:.0f} | "
                    f"{1000 * shallow_s:.0f} | {ratio:.3f} | {bounds} |")
        del unet
    load = Path("/proc/loadavg").read_text().split()[0]
    append_report(ROOT / "bench" / "results" / "deepcache.md", [
        f"## {time.strftime('%Y-%m-%d %H:%M')} — shallow vs full step by architecture, PyTorch CPU, batch 2, "
        f"{args.latent}x{args.latent} latents, load average {load}" + (f" ({args.note})" if args.note else ""),
        "", f"`{shlex.join(['.venv/bin/python', 'bench/bench_deepcache_architectures.py', *sys.argv[1:]])}`", "",
        "| U-Net layout | parameters | full step ms | shallow step ms | shallow / full | "
        "speed-up bound N=2 | N=3 | N=5 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|", *rows])


if __name__ == "__main__":
    main()
