"""A real peer for bench/bench_goodput.py: diffusers' own pipeline on a diffusers folder behind
a minimal concurrent HTTP server, in the shape of diffusers' `examples/server-async`
(RequestScopedPipeline): one copy of the weights in memory; per request a shallow copy of
the pipeline with its own scheduler (scheduler state is per request), the tokenizer under a
lock, the call in a worker thread, so requests run concurrently.

    .venv/bin/python bench/peer_diffusers.py --folder zoo/checkpoints/sd_digits --port 8100

It speaks the subset of genserve's API the goodput mix uses, so the bench sends the same
bodies to both: POST /v1/txt2img and /v1/img2img (JSON, `image` as base64 PNG) answer
{"images": [{"image": <base64 PNG>, "seed": ...}]}; POST /v1/txt2img/stream answers the same
as one server-sent `result` event (a pipeline call has no previews to stream). GET /readyz.
Torch on CPU by default (`--device cuda`: fp16 on the GPU, for the same bench on a GPU host);
the benchmark's client is the only caller.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import io
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import uvicorn  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from PIL import Image  # noqa: E402

import export.torchvision_compat  # noqa: E402,F401  (before diffusers: see DESIGN.md)

SCHEDULERS = {"ddim": DDIMScheduler, "euler": EulerDiscreteScheduler}


class RequestScoped:
    """One loaded pipeline; per request a shallow copy with a fresh scheduler, so that
    concurrent calls share the weights and never each other's timesteps."""

    def __init__(self, folder: Path, device: str = "cpu"):
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
        self.device = device
        pipeline = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, torch_dtype=dtype)
        self.txt2img = pipeline.to(device)
        self.txt2img.set_progress_bar_config(disable=True)
        self.img2img = StableDiffusionImg2ImgPipeline(**self.txt2img.components)
        self.img2img.set_progress_bar_config(disable=True)
        self.tokenizer_lock = threading.Lock()  # a fast tokenizer is not safe across threads

    def __call__(self, body: dict) -> list[Image.Image]:
        image = body.get("image")
        base = self.img2img if image else self.txt2img
        local = copy.copy(base)
        scheduler = SCHEDULERS[body.get("scheduler") or "ddim"]
        local.scheduler = scheduler.from_config(base.scheduler.config)
        local.tokenizer = LockedTokenizer(base.tokenizer, self.tokenizer_lock)
        generator = torch.Generator(self.device).manual_seed(int(body.get("seed", 0)))
        kwargs = dict(prompt=body["prompt"], negative_prompt=body.get("negative_prompt") or None,
                      num_inference_steps=int(body.get("num_inference_steps", 20)),
                      guidance_scale=float(body.get("guidance_scale", 7.5)), generator=generator,
                      num_images_per_prompt=int(body.get("num_images", 1)))
        with torch.inference_mode():
            if image:
                init = Image.open(io.BytesIO(base64.b64decode(image)))
                if local.vae.config.in_channels == 1:  # a grayscale model (the demo digits)
                    init = init.convert("L")
                return local(image=init, strength=float(body.get("strength", 0.8)), **kwargs).images
            return local(height=body.get("height"), width=body.get("width"), **kwargs).images


class LockedTokenizer:
    """The tokenizer's calls under a lock; every other attribute read through."""

    def __init__(self, tokenizer, lock: threading.Lock):
        self._tokenizer, self._lock = tokenizer, lock

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def build_app(pipeline: RequestScoped, workers: int) -> FastAPI:
    app = FastAPI()
    pool = ThreadPoolExecutor(max_workers=workers)

    async def generate(request: Request) -> dict:
        body = await request.json()
        images = await asyncio.get_running_loop().run_in_executor(pool, pipeline, body)
        seed = int(body.get("seed", 0))
        return {"images": [{"image": png_base64(im), "seed": seed + i} for i, im in enumerate(images)]}

    @app.get("/readyz")
    async def ready() -> dict:
        return {"status": "ready"}

    @app.post("/v1/txt2img")
    async def txt2img(request: Request):
        return JSONResponse(await generate(request))

    @app.post("/v1/img2img")
    async def img2img(request: Request):
        return JSONResponse(await generate(request))

    @app.post("/v1/txt2img/stream")
    async def txt2img_stream(request: Request):
        result = await generate(request)

        async def events():
            yield f"event: result\ndata: {json.dumps(result)}\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, default=ROOT / "zoo" / "checkpoints" / "sd_digits")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=4, help="pipeline calls that run at once (threads)")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads per call. 1: on 2 shared cores (load ~9) one 20-step guided "
                             "call took 0.9-1.1 s with 1 thread and 11.6 s with 2 (threads waiting on each other); "
                             "the worker threads use the cores instead")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, or cuda (fp16) on a GPU host")
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)
    pipeline = RequestScoped(args.folder, args.device)
    uvicorn.run(build_app(pipeline, args.workers), host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
