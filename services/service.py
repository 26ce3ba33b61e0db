"""The genserve BentoML service: `bentoml serve services.service:GenServe`.

BentoML owns the process model, /livez, /readyz (through __is_ready__) and /metrics;
the /v1 API is a FastAPI app mounted into the service, so every endpoint shares one
error shape, request ids, and typed pydantic bodies that appear on the OpenAPI page.
"""

import asyncio
import base64
import json
import logging
import secrets
import time

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from services.config import Settings
from services.diffusion_requests import side_limits
from services.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ServiceError,
    TooManyRequests,
)
from services.http import EventStream, RequestIdMiddleware, install_error_handlers, parse_body, request_id_var
from services.imaging import FORMATS, encode_image, to_uint8
from services.schedulers import SCHEDULERS
from services.schemas import (
    MAX_DIFFUSION_IMAGES,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES_PER_REQUEST,
    MAX_INFERENCE_STEPS,
    MAX_SEED,
    DiffusionResponse,
    GANGenerateRequest,
    GANGenerateResponse,
    GeneratedImage,
    Img2ImgRequest,
    InpaintRequest,
    ModelDescription,
    ModelList,
    TensorDescription,
    Txt2ImgRequest,
    Txt2ImgStreamRequest,
)

# How often a waiting request checks whether its client went away.
DISCONNECT_POLL_S = 0.1


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _body_schema(model) -> dict:
    """OpenAPI for endpoints that parse JSON or multipart themselves."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema}, "multipart/form-data": {"schema": schema}}}}


def _tensors(items) -> list[TensorDescription]:
    return [TensorDescription(name=t.name, datatype=str(t.dtype), shape=list(t.dims)) for t in items]

log = logging.getLogger("genserve")

app = FastAPI(
    title="genserve",
    description="Image generation endpoints. Errors: {'error': {code, message, field?, limit?}}.",
    version="1",
)
app.add_middleware(RequestIdMiddleware)


@bentoml.service(name="genserve", workers=1, traffic={"timeout": 300})
@bentoml.asgi_app(app, path="/v1")
class GenServe:
    def __init__(self) -> None:
        # Imported here: the runtime loads ONNX Runtime, and metrics must be created
        # after BentoML's worker set up multiprocess Prometheus (see services.metrics).
        from services.metrics import ServiceMetrics
        from services.pipelines.pipeline_gan import GANPipeline
        from services.engine.engine import DiffusionEngine
        from services.engine.prompt_cache import PromptCache
        from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
        from services.runtime import create_backend

        log.setLevel(logging.INFO)  # request ids in the log, beside BentoML's access log
        self.settings = Settings.from_env()
        self.metrics = ServiceMetrics()
        install_error_handlers(app, on_error=lambda path, code: self.metrics.errors.labels(path, code).inc())
        self.backend = create_backend(self.settings)
        self.backend.add_observer(self.metrics.observe_execution)
        self.gan = {
            name: GANPipeline(self.backend, name)
            for name, spec in sorted(self.backend.models().items())
            if spec.parameters.get("genserve.pipeline") == "gan"
        }
        if self.gan and self.settings.default_gan_model not in self.gan:
            raise ValueError(
                f"GENSERVE_DEFAULT_GAN_MODEL={self.settings.default_gan_model!r} is not in the repository "
                f"(GAN models: {', '.join(self.gan)})"
            )
        # One step-level engine per diffusion pipeline; its batch limit is the U-Net's.
        cache = PromptCache(self.settings.prompt_cache_size, on_lookup=self.metrics.observe_prompt_cache)
        self.engines = {}
        for name, models in discover_stable_diffusion(self.backend.models()).items():
            self.engines[name] = DiffusionEngine(
                StableDiffusionPipeline(self.backend, models),
                max_batch_rows=self.backend.models()[models.unet].max_batch_size,
                max_queued_image_steps=self.settings.max_queued_steps,
                prompt_cache=cache, observer=self.metrics.engine_observer())
        if self.engines and self.settings.default_diffusion_model not in self.engines:
            raise ValueError(
                f"GENSERVE_DEFAULT_DIFFUSION_MODEL={self.settings.default_diffusion_model!r} is not in the "
                f"repository (diffusion pipelines: {', '.join(self.engines)})"
            )
        log.info("genserve ready: backend=%s models=%s", self.backend.name, sorted(self.backend.models()))

    async def __is_ready__(self) -> bool:
        return await self.backend.is_ready()

    @app.post("/gan/generate", response_model=GANGenerateResponse)
    async def gan_generate(self, body: GANGenerateRequest) -> GANGenerateResponse:
        """Samples a GAN generator: seeded, optionally truncated and class-conditioned."""
        start = time.perf_counter()
        # 1. Check inputs against the chosen model.
        name = body.model or self.settings.default_gan_model
        if name not in self.gan:
            raise ModelNotFound(f"model {name!r} is not a GAN served here", field="model", allowed=sorted(self.gan))
        pipeline = self.gan[name]
        num_classes = pipeline.info.num_classes
        if body.class_label is not None and num_classes == 0:
            raise InvalidRequest(f"model {name!r} is unconditional: omit class_label", field="class_label")
        if body.class_label is not None and body.class_label >= num_classes:
            raise InvalidRequest(f"class_label must be below {num_classes} for model {name!r}",
                                 field="class_label", limit=num_classes - 1)
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)

        # 2. Generate.
        out = await pipeline(seed, body.num_images, body.truncation_psi, body.class_label)

        # 3. Encode, with provenance in each image's metadata.
        labels = out.class_labels or [None] * len(out.seeds)
        images = self._encode(
            out.images, pipeline.info.output_range, body.output_format,
            [{"model": name, "version": pipeline.spec.version, "seed": seed, "class_label": label,
              "truncation_psi": body.truncation_psi} for seed, label in zip(out.seeds, labels)],
        )
        for image, label in zip(images, labels):
            image.class_label = label
        total = self._record("gan", name, len(images), start)
        return GANGenerateResponse(
            request_id=request_id_var.get(), model=name, model_version=pipeline.spec.version,
            backend=self.backend.name,
            parameters={**body.model_dump(exclude={"model"}), "seed": seed},
            images=images,
            timings={"inference_seconds": round(out.inference_seconds, 6), "total_seconds": round(total, 6)},
        )

    def _encode(self, images: np.ndarray, value_range, fmt: str, metas: list[dict]) -> list[GeneratedImage]:
        out = []
        for i, (pixels, meta) in enumerate(zip(to_uint8(images, *value_range), metas)):
            data = encode_image(pixels, fmt, meta)
            out.append(GeneratedImage(
                index=i, seed=meta["seed"], media_type=FORMATS[fmt], width=pixels.shape[1],
                height=pixels.shape[0], data=base64.b64encode(data).decode("ascii")))
        return out

    def _record(self, pipeline: str, model: str, num_images: int, start: float) -> float:
        total = time.perf_counter() - start
        labels = {"pipeline": pipeline, "model": model, "backend": self.backend.name}
        self.metrics.images_generated.labels(**labels).inc(num_images)
        self.metrics.pipeline_duration_seconds.labels(**labels).observe(total)
        return total

    @app.post("/txt2img", response_model=DiffusionResponse)
    async def txt2img(self, body: Txt2ImgRequest, request: Request) -> DiffusionResponse:
        """Text to image with latent diffusion and classifier-free guidance."""
        return await self._diffuse("txt2img", body, request)

    @app.post("/img2img", response_model=DiffusionResponse, openapi_extra=_body_schema(Img2ImgRequest))
    async def img2img(self, request: Request) -> DiffusionResponse:
        """Image to image: the input image noised to `strength`, then denoised toward the prompt.
        JSON (image as base64) or multipart/form-data (image as a file)."""
        return await self._diffuse("img2img", await parse_body(request, Img2ImgRequest), request)

    @app.post("/inpaint", response_model=DiffusionResponse, openapi_extra=_body_schema(InpaintRequest))
    async def inpaint(self, request: Request) -> DiffusionResponse:
        """Repaints the white area of `mask`, keeping the rest of `image` (latent blending)."""
        return await self._diffuse("inpaint", await parse_body(request, InpaintRequest), request)

    async def _diffuse(self, task: str, body, request: Request) -> DiffusionResponse:
        """Validates, queues on the pipeline's engine, waits (leaving the batch if the
        client goes away), and answers with the images and everything that reproduces them."""
        start = time.perf_counter()
        name, handle, params = self._submit(task, body)
        engine = self.engines[name]
        while not handle.status.finished:
            try:
                await asyncio.wait_for(handle.done.wait(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(handle)  # leaves at the next step; nobody reads the answer
                    raise ClientDisconnected()
        return self._respond(task, name, body, params, handle, start)

    def _submit(self, task: str, body):
        from services.diffusion_requests import build_request
        from services.engine.scheduler import QueueFull
        from services.pipelines.pipeline_stable_diffusion import PromptTooLong

        name = body.model or self.settings.default_diffusion_model
        if name not in self.engines:
            raise ModelNotFound(f"model {name!r} is not a diffusion pipeline served here", field="model",
                                allowed=sorted(self.engines))
        timeout_s = body.timeout_s or self.settings.request_timeout_s
        if timeout_s > self.settings.max_request_timeout_s:
            raise InvalidRequest(f"timeout_s must be at most {self.settings.max_request_timeout_s}",
                                 field="timeout_s", limit=self.settings.max_request_timeout_s)
        request, params = build_request(task, body, self.engines[name].pipeline.models)
        params["timeout_s"] = timeout_s
        try:
            handle = self.engines[name].submit(request, timeout_s, getattr(body, "preview_every", 0))
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), field=exc.field_name, limit=exc.limit) from None
        except QueueFull as exc:
            raise TooManyRequests(f"the {name} queue is full ({exc}); retry in {exc.retry_after_s}s",
                                  limit=exc.limit, headers={"Retry-After": str(exc.retry_after_s)}) from None
        return name, handle, params

    def _respond(self, task: str, name: str, body, params: dict, handle, start: float) -> DiffusionResponse:
        from services.engine.request import RequestStatus

        if handle.status == RequestStatus.FINISHED_TIMEOUT:
            raise DeadlineExceeded(f"the request did not finish within timeout_s={params['timeout_s']}",
                                   field="timeout_s", limit=params["timeout_s"])
        if handle.status != RequestStatus.FINISHED_DONE:
            if isinstance(handle.error, ServiceError):
                raise handle.error
            raise InferenceFailed(f"generation failed: {handle.error}")
        out = handle.result
        images = self._encode(out.images, (-1.0, 1.0), body.output_format, [
            {"model": name, "task": task, "seed": seed, "prompt": body.prompt,
             "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
             "scheduler": body.scheduler} for seed in out.seeds])
        total = self._record(task, name, len(images), start)
        return DiffusionResponse(
            request_id=request_id_var.get(), model=name, backend=self.backend.name, parameters=params,
            images=images, timings={**{k: round(v, 6) for k, v in out.timings.items()}, "total_seconds": round(total, 6)},
        )

    @app.post("/txt2img/stream", response_class=StreamingResponse)
    async def txt2img_stream(self, body: Txt2ImgStreamRequest) -> StreamingResponse:
        """Server-sent events: `progress` per step (step, total, elapsed), `preview` every
        `preview_every` steps (the current x0 estimate as images), then `result` (the
        txt2img response) or `error`. Closing the connection cancels the request."""
        start = time.perf_counter()
        name, handle, params = self._submit("txt2img", body)
        engine = self.engines[name]

        async def events():
            # The request id context variable is still set: streaming runs inside the
            # request's middleware call.
            while (event := await handle.events.get()) is not None:
                if event["event"] == "preview":
                    event["images"] = [im.model_dump() for im in self._encode(
                        event["images"], (-1.0, 1.0), "png",
                        [{"model": name, "seed": s, "preview_step": event["step"]}
                         for s in range(params["seed"], params["seed"] + body.num_images)])]
                yield sse(event.pop("event"), event)
            try:
                yield sse("result", self._respond("txt2img", name, body, params, handle, start).model_dump())
            except ServiceError as exc:
                yield sse("error", {**exc.body(request_id_var.get()), "status": exc.status})

        # A client that hangs up leaves the batch at the next step.
        return EventStream(events(), on_close=lambda: engine.cancel(handle))

    @app.get("/models", response_model=ModelList)
    async def list_models(self) -> ModelList:
        """What is served: each model's pipeline, endpoint, tensors and request limits."""
        models = []
        for name, pipeline in self.gan.items():
            spec, info = pipeline.spec, pipeline.info
            params = {
                "num_images": {"min": 1, "max": MAX_IMAGES_PER_REQUEST},
                "seed": {"min": 0, "max": MAX_SEED},
                "truncation_psi": {"min": 0.0, "max": 1.0},
                "output_format": sorted(FORMATS),
            }
            if info.num_classes:
                params["class_label"] = {"min": 0, "max": info.num_classes - 1}
            models.append(ModelDescription(
                name=name, version=spec.version, pipeline="gan", endpoint="/v1/gan/generate",
                backend=self.backend.name, max_batch_size=spec.max_batch_size,
                inputs=_tensors(spec.inputs), outputs=_tensors(spec.outputs), parameters=params,
            ))
        for name, engine in self.engines.items():
            m = engine.pipeline.models
            unet = self.backend.models()[m.unet]
            side = side_limits(m)
            models.append(ModelDescription(
                name=name, version=unet.version, pipeline="stable_diffusion",
                endpoint="/v1/txt2img, /v1/txt2img/stream" + (", /v1/img2img, /v1/inpaint" if m.vae_encoder else ""),
                backend=self.backend.name, max_batch_size=unet.max_batch_size,
                inputs=_tensors(unet.inputs), outputs=_tensors(unet.outputs),
                parameters={
                    "components": [c for c in (m.text_encoder, m.unet, m.vae_decoder, m.vae_encoder) if c],
                    "schedulers": sorted(SCHEDULERS),
                    "prompt_max_tokens": m.max_length,
                    "num_images": {"min": 1, "max": MAX_DIFFUSION_IMAGES},
                    "num_inference_steps": {"min": 1, "max": MAX_INFERENCE_STEPS},
                    "guidance_scale": {"min": 0.0, "max": MAX_GUIDANCE_SCALE},
                    "height": side, "width": side,
                    "strength": {"min": 0.0, "max": 1.0, "exclusive_min": True},
                    "seed": {"min": 0, "max": MAX_SEED}, "output_format": sorted(FORMATS),
                    "timeout_s": {"default": self.settings.request_timeout_s,
                                  "max": self.settings.max_request_timeout_s},
                },
            ))
        return ModelList(default_models={"gan": self.settings.default_gan_model,
                                         "diffusion": self.settings.default_diffusion_model}, models=models)
