"""One line per model family over real HTTP: requests/s and latency at concurrency 1 and 8.

    .venv/bin/python bench/bench_families.py --seconds 8     # starts its own service

The service serves the demo repository plus random-weight SDXL- and FLUX-format pipelines
exported into a copy of it (no SDXL or FLUX demo is trained here: their lines measure the
pipelines' overhead on tiny models, not those models' cost; one FLUX folder is
guidance-distilled, one-row-per-image, the other runs true classifier-free guidance).
Diffusion lines also give the latency per denoising step (p50 / steps). All families run in one process run, one
after another, so their figures compare on a noisy machine; the table and the command
are appended to bench/results/families.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.load import measure, summarise  # noqa: E402
from tests.fixtures.local_server import LocalServer  # noqa: E402


def digit_png() -> str:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def workloads(image: str) -> list[tuple[str, str, callable, int | None]]:
    """(family, path, body for request i, denoising steps per request or None)."""
    diffusion = {"sd (txt2img, 20 steps)": 20, "sd (img2img, 20 x 0.8)": 16, "sdxl random (txt2img, 20 steps)": 20,
                 "flux random, guidance input (txt2img, 20 steps)": 20,
                 "flux random, true cfg (txt2img, 20 steps)": 20, "ddpm (20 ddim steps)": 20}
    return [(family, path, body, diffusion.get(family)) for family, path, body in [
        ("gan", "/v1/gan/generate", lambda i: {"seed": i, "class_label": i % 10}),
        ("stylegan generate", "/v1/gan/generate", lambda i: {"model": "stylegan_digits", "seed": i,
                                                             "class_label": i % 10, "truncation_psi": 0.7}),
        ("stylegan mix", "/v1/gan/mix", lambda i: {"model": "stylegan_digits", "seed": i, "style_seed": i + 1}),
        ("stylegan interpolate (w, 8 frames)", "/v1/gan/interpolate",
         lambda i: {"model": "stylegan_digits", "seeds": [i, i + 1], "frames": 8}),
        ("sd (txt2img, 20 steps)", "/v1/txt2img", lambda i: {"prompt": "a handwritten digit seven", "seed": i}),
        ("sd (img2img, 20 x 0.8)", "/v1/img2img", lambda i: {"prompt": "seven", "image": image, "seed": i}),
        ("sdxl random (txt2img, 20 steps)", "/v1/txt2img", lambda i: {"model": "xl_bench", "prompt": "a red cat",
                                                                     "seed": i}),
        ("flux random, guidance input (txt2img, 20 steps)", "/v1/txt2img",
         lambda i: {"model": "flux_bench", "prompt": "a red cat", "seed": i}),
        ("flux random, true cfg (txt2img, 20 steps)", "/v1/txt2img",
         lambda i: {"model": "flux_cfg_bench", "prompt": "a red cat", "guidance_scale": 3.5, "seed": i}),
        ("ddpm (20 ddim steps)", "/v1/ddpm/generate", lambda i: {"seed": i, "class_label": i % 10}),
        ("vae encode", "/v1/vae/encode", lambda i: {"image": image}),
        ("vae sample", "/v1/vae/sample", lambda i: {"seed": i}),
    ]]


def repository_with_random_families(workdir: Path) -> Path:
    from export.flux import export_flux
    from export.stable_diffusion_xl import export_stable_diffusion_xl
    from tests.fixtures.flux_folder import build_random_flux_folder
    from tests.fixtures.sdxl_folder import build_random_sdxl_folder

    repo = workdir / "repository"
    shutil.copytree(ROOT / "model_repository", repo)
    folder = build_random_sdxl_folder(workdir / "sdxl", seed=0, sample_size=16)
    export_stable_diffusion_xl(folder, repo, "xl_bench", progress=lambda _: None)
    for name, guidance_embeds in (("flux_bench", True), ("flux_cfg_bench", False)):
        folder = build_random_flux_folder(workdir / name, seed=0, guidance_embeds=guidance_embeds)
        export_flux(folder, repo, name, progress=lambda _: None, max_sequence_length=24, native_size=32)
    return repo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds per (family, concurrency) (default 8)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "families.md")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        repo = repository_with_random_families(Path(tmp))
        server = LocalServer({"GENSERVE_MODEL_REPOSITORY": str(repo)}, Path(tmp) / "bentoml.log")
        try:
            server.wait_ready()
            for family, path, body, steps in workloads(digit_png()):
                for concurrency in (1, 8):
                    r = summarise([asyncio.run(measure(server.url, path, body, concurrency, args.seconds))])
                    rows.append((family, concurrency, r, steps))
                    print(f"{family:34} c={concurrency}: {r['rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                          f"p95 {r['p95_ms']:7.1f} ms  errors {r['errors']}", flush=True)
        finally:
            server.stop()
    lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} on {platform.node()} ({platform.machine()})\n",
             f"`python bench/bench_families.py --seconds {args.seconds:g}`\n",
             "| family | concurrency | requests | errors | req/s | x req/s vs c=1 | p50 ms | p95 ms | p50 ms/step |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {}
    for family, concurrency, r, steps in rows:
        base.setdefault(family, r["rps"])
        per_step = f"{r['p50_ms'] / steps:.2f}" if steps else ""
        lines.append(f"| {family} | {concurrency} | {r['requests']} | {r['errors']} | {r['rps']:.1f} | "
                     f"{r['rps'] / base[family]:.2f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | {per_step} |")
    with open(args.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print(f"appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
