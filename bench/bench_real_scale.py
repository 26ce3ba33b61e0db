"""Real scale on this machine: an SD 1.5- (or SD 2.1-) size folder exported, served and compared
with diffusers.

    nice -n 10 .venv/bin/python bench/bench_real_scale.py --size sd15 --workdir /tmp/real_scale
    nice -n 10 .venv/bin/python bench/bench_real_scale.py --size sd21 --workdir /tmp/real_scale

The folder has the real architectures and configs (written here, nothing downloaded) and random
weights: SD 1.5's U-Net (859.5M parameters), CLIP ViT-L/14 text encoder and 512² VAE, or SD 2.1's
(attention heads per level, linear projections, OpenCLIP ViT-H text encoder, 768², v-prediction).
The tokenizer is the real CLIP BPE, read from `open_clip_torch` (`pip install open_clip_torch==3.3.0`:
it ships `bpe_simple_vocab_16e6.txt.gz`; vocab.json and merges.txt are built from it as OpenAI's
CLIP does). The scheduler config is DDIM with the model's betas (SD 1.5 ships PNDM, which the
service does not run; DDIM is what both sides run here).

Reports, one process run, in this order (one heavy thing at a time):
  1. export (`python -m export sd`): wall, peak RSS of the export process, and the export report
     per component (wall, peak RSS, what was verified, max error);
  2. the service on the embedded ONNX Runtime: cold start (process start to /readyz 200) and RSS
     after load, then /v1/txt2img at the native size, `--steps` DDIM steps with guidance 7.5;
  3. diffusers' StableDiffusionPipeline on the same latents (services.pipelines.diffusion.
     initial_latents): PSNR of the two 8-bit images;
  4. ms per guided U-Net call (batch 2, native size): diffusers eager vs the exported graph in
     ONNX Runtime, the same inputs, one after the other.
Results are appended to bench/results/real_scale.md with the command.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import export  # noqa: E402,F401  (torchvision beside the CPU torch, before diffusers)

SIZES = {
    "sd15": dict(
        unet=dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                  block_out_channels=(320, 640, 1280, 1280)),
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  projection_dim=768, hidden_act="quick_gelu"),
        pad_token="<|endoftext|>", image=512, prediction_type="epsilon"),
    "sd21": dict(
        unet=dict(sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
                  block_out_channels=(320, 640, 1280, 1280), use_linear_projection=True),
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  projection_dim=512, hidden_act="gelu"),
        pad_token="!", image=768, prediction_type="v_prediction"),
}
PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"


def clip_bpe() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("the real CLIP BPE comes from open_clip_torch: pip install open_clip_torch==3.3.0")
    return Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def write_clip_tokenizer(dest: Path, pad_token: str) -> int:
    """vocab.json + merges.txt from the CLIP BPE, as OpenAI's CLIP builds its vocabulary (byte
    symbols, the same with </w>, the first 48,894 merges, then the two specials): 49,408 ids."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    merges = gzip.open(clip_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    CLIPTokenizer(str(dest / "vocab.json"), str(dest / "merges.txt"), pad_token=pad_token,
                  model_max_length=77).save_pretrained(dest)
    return len(vocab)


def build_folder(folder: Path, size: str) -> None:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if (folder / "model_index.json").exists():
        return
    spec = SIZES[size]
    torch.manual_seed(0)
    vocab = write_clip_tokenizer(folder / "tokenizer", spec["pad_token"])
    CLIPTextModel(CLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, **spec["text"])).save_pretrained(
        folder / "text_encoder")
    unet = UNet2DConditionModel(**spec["unet"])
    print(f"U-Net: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters", flush=True)
    unet.save_pretrained(folder / "unet")
    del unet
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=2, sample_size=spec["image"]).save_pretrained(folder / "vae")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, prediction_type=spec["prediction_type"]).save_pretrained(
        folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
        "feature_extractor": [None, None], "safety_checker": [None, None], "requires_safety_checker": False,
        "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))


def tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])
    except psutil.NoSuchProcess:
        return 0


def run_watched(cmd: list[str], log: Path) -> tuple[int, float, int]:
    """(exit code, wall s, peak RSS of the process tree)."""
    start, peak = time.perf_counter(), 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.5)
    return proc.returncode, time.perf_counter() - start, peak


def psnr8(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def serve_and_generate(repository: Path, name: str, side: int, steps: int, seed: int, workdir: Path) -> dict:
    import httpx
    import numpy as np
    from PIL import Image

    from tests.fixtures.local_server import LocalServer

    start = time.perf_counter()
    server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(repository), "GENSERVE_BACKEND": "onnxruntime",
                          "GENSERVE_DEFAULT_DIFFUSION_MODEL": name, "GENSERVE_REQUEST_TIMEOUT_S": "1800",
                          "GENSERVE_MAX_REQUEST_TIMEOUT_S": "1800"}, workdir / "service.log")
    try:
        server.wait_ready(timeout=1800)
        cold = time.perf_counter() - start
        rss = tree_rss(server.proc.pid)
        body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "height": side, "width": side,
                "num_inference_steps": steps, "guidance_scale": 7.5, "scheduler": "ddim", "seed": seed,
                "timeout_s": 1800}
        t0 = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/txt2img", json=body, timeout=1900)
        latency = time.perf_counter() - t0
        r.raise_for_status()
        data = r.json()
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data["images"][0]["data"]))).convert("RGB"))
        peak_rss = tree_rss(server.proc.pid)
        with open(workdir / "service.log") as f:
            warm = [line.strip() for line in f if "warm-up" in line]
    finally:
        server.stop()
    return {"cold_start_s": cold, "rss_after_load": rss, "rss_after_request": peak_rss, "latency_s": latency,
            "timings": data["timings"], "image": image, "warmup_log": warm[-1] if warm else ""}


def diffusers_reference(folder: Path, side: int, steps: int, seed: int):
    import numpy as np
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from services.pipelines.diffusion import initial_latents

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    latents = torch.from_numpy(np.stack(initial_latents(seed, 1, (4, side // 8, side // 8))))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, guidance_scale=7.5,
                   latents=latents, output_type="np", height=side, width=side).images[0]
    took = time.perf_counter() - t0
    image = (out * 255).round().clip(0, 255).astype(np.uint8)  # diffusers' numpy_to_pil
    return pipe, image, took


def unet_call_ms(pipe, onnx_path: Path, side: int, calls: int) -> tuple[list[float], list[float]]:
    """Guided U-Net calls (batch 2) at the native size: diffusers eager, then ONNX Runtime
    (the pipeline freed first: one copy of the weights at a time). The graph's ControlNet
    residual inputs get zeros, as the service feeds rows without control."""
    import gc

    import numpy as np
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(0)
    hidden = pipe.text_encoder.config.hidden_size
    inputs = {"sample": rng.standard_normal((2, 4, side // 8, side // 8), dtype=np.float32),
              "timestep": np.array([500.0, 500.0], np.float32),
              "encoder_hidden_states": rng.standard_normal((2, 77, hidden), dtype=np.float32)}
    eager = []
    with torch.no_grad():
        for i in range(calls + 1):
            t0 = time.perf_counter()
            pipe.unet(*(torch.from_numpy(inputs[k]) for k in ("sample", "timestep", "encoder_hidden_states")),
                      return_dict=False)
            if i:
                eager.append(1000 * (time.perf_counter() - t0))
    unet = None
    del pipe, unet
    gc.collect()
    from services.pipelines.controlnet import zero_residuals
    from services.runtime.repository import ModelRepository

    spec = ModelRepository(onnx_path.parents[2])[onnx_path.parents[1].name]
    inputs.update(zero_residuals(spec, 2, side // 8, side // 8))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    onnx = []
    for i in range(calls + 1):
        t0 = time.perf_counter()
        session.run(["noise_pred"], {k: v for k, v in inputs.items() if k in names})
        if i:
            onnx.append(1000 * (time.perf_counter() - t0))
    return eager, onnx


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="sd15")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/genserve_real_scale"))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--unet-calls", type=int, default=2, help="timed U-Net calls per engine (after one untimed)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "real_scale.md")
    parser.add_argument("--reuse-export", action="store_true",
                        help="serve and compare the repository a previous run exported (its export_report.json "
                             "gives the per-component figures; the export process's own wall and peak are "
                             "not re-measured)")
    args = parser.parse_args(argv)
    import numpy as np

    side = SIZES[args.size]["image"]
    work = args.workdir / args.size
    folder, repository = work / "folder", work / "repository"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_folder(folder, args.size)
    print(f"folder ready ({time.perf_counter() - t0:.0f} s)", flush=True)

    name = args.size
    if args.reuse_export:
        export_wall, export_peak = None, None
    else:
        rc, export_wall, export_peak = run_watched(
            [sys.executable, "-m", "export", "sd", "--folder", str(folder), "--name", name, "--repository",
             str(repository)], work / "export.log")
        if rc:
            print((work / "export.log").read_text()[-4000:])
            return rc
    report = json.loads((repository / "export_report.json").read_text())[name]
    if export_wall is None:  # the exporter's own figures for the whole export
        export_wall, export_peak = report["wall_s"], report["peak_rss_gib"] * 2**30
    print(f"export: {export_wall:.0f} s, peak RSS {export_peak / 2**30:.2f} GiB", flush=True)

    served = serve_and_generate(repository, name, side, args.steps, args.seed, work)
    print(f"service: cold start {served['cold_start_s']:.0f} s, RSS {served['rss_after_load'] / 2**30:.2f} GiB; "
          f"txt2img {served['latency_s']:.0f} s", flush=True)
    pipe, reference, reference_s = diffusers_reference(folder, side, args.steps, args.seed)
    quality = psnr8(served["image"], reference)
    print(f"PSNR vs diffusers {quality:.1f} dB (diffusers {reference_s:.0f} s)", flush=True)
    eager, onnx = unet_call_ms(pipe, repository / f"{name}_unet" / "1" / "model.onnx", side, args.unet_calls)
    del pipe

    saturated = float(np.mean((reference == 0) | (reference == 255)))
    lines = [
        f"\n## {args.size}: {side}x{side}, {args.steps} DDIM steps, guidance 7.5 "
        f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n",
        f"Command: `.venv/bin/python bench/bench_real_scale.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; load average "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end (1, 5, 15 min).\n",
        f"Export (`python -m export sd`): **{export_wall / 60:.1f} min, peak RSS {export_peak / 2**30:.2f} GiB** "
        f"({'the export report' if args.reuse_export else 'the export process, watched from outside'}).\n",
        "| component | wall | peak RSS | max abs error | verified |", "|---|---|---|---|---|",
    ]
    lines += [f"| {c['component']} | {c['wall_s']:.0f} s | {c['peak_rss_gib']:.2f} GiB | {c['max_abs_error']:.1e} | "
              f"{c['verified']} |" for c in report["components"]]
    lines += [
        "",
        f"Service (embedded ONNX Runtime): cold start to /readyz **{served['cold_start_s']:.0f} s**, RSS after load "
        f"**{served['rss_after_load'] / 2**30:.2f} GiB**, {served['rss_after_request'] / 2**30:.2f} GiB after the "
        f"request. Warm-up: `{served['warmup_log'][-200:]}`",
        "",
        f"txt2img {side}²: service {served['latency_s']:.0f} s (stages: "
        + ", ".join(f"{k} {v:.1f}" for k, v in served["timings"].items()) + f"); diffusers {reference_s:.0f} s. "
        f"**PSNR vs diffusers on the same latents: {quality:.1f} dB** (8-bit; {100 * saturated:.0f}% of the "
        f"reference's channel values are 0 or 255: random weights).",
        "",
        f"Guided U-Net call (batch 2, {side // 8}² latents): diffusers eager "
        f"{' / '.join(f'{m:.0f}' for m in eager)} ms, ONNX Runtime {' / '.join(f'{m:.0f}' for m in onnx)} ms "
        f"(median ratio ONNX/eager {np.median(onnx) / np.median(eager):.2f}).",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    if not args.results.exists():
        args.results.write_text("# Real scale: SD 1.5 / 2.1-size folders exported, served, compared with diffusers\n\n"
                                "Written by `bench/bench_real_scale.py` (its docstring says what it does).\n")
    with open(args.results, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
