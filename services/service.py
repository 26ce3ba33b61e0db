"""The genserve BentoML service: `bentoml serve services.service:GenServe`.

BentoML owns the process model, /livez, /readyz (through __is_ready__) and /metrics;
the /v1 API is a FastAPI app mounted into the service, so every endpoint shares one
error shape, request ids, and typed pydantic bodies that appear on the OpenAPI page.
"""

import asyncio
import base64
import json
import logging
import time

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from services.openapi import GET_ERRORS, body_schema, error_responses
from services.config import Settings
from services.diffusion_requests import side_limits
from services.errors import (
    BackendUnavailable,
    ClientDisconnected,
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ServiceError,
    RateLimited,
    TooManyRequests,
)
from services.gateway import Gateway, Route, client_var, request_id_var
from services.http import EventStream, install_error_handlers, parse_body
from services.imaging import FORMATS, encode_image, to_uint8
from services.schedulers import SCHEDULERS
from services.schemas import (
    MAX_DIFFUSION_IMAGES,
    MAX_GUIDANCE_SCALE,
    MAX_IMAGES_PER_REQUEST,
    MAX_INFERENCE_STEPS,
    MAX_SEED,
    MIN_TIMEOUT_S,
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
    resolve_seed,
)

# How often a waiting request checks whether its client went away.
DISCONNECT_POLL_S = 0.1


def sse(event: str, data: dict) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _tensors(items) -> list[TensorDescription]:
    return [TensorDescription(name=t.name, datatype=str(t.dtype), shape=list(t.dims)) for t in items]

log = logging.getLogger("genserve")

app = FastAPI(
    title="genserve",
    description="Image generation endpoints. Every error: {'error': {code, message, field?, limit?, request_id}}. "
                "With API keys on, send `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    version="1",
)


def edge_routes(api: FastAPI) -> dict[str, Route]:
    """What the gateway lets through: BentoML's health and metrics, the /v1 API (paths,
    methods and body types as its OpenAPI document states them) and its docs pages."""
    health = dict(public=True, limited=False, drains=False)
    routes = {path: Route(frozenset({"GET"}), **health) for path in ("/livez", "/readyz", "/healthz", "/metrics")}
    for path, operations in api.openapi()["paths"].items():
        content = set()
        for op in operations.values():
            content |= set(op.get("requestBody", {}).get("content", {}))
        routes["/v1" + path] = Route(frozenset(m.upper() for m in operations), frozenset(content))
    for r in api.routes:  # the docs pages and openapi.json are plain routes
        if getattr(r, "include_in_schema", True) is False and hasattr(r, "methods"):
            routes["/v1" + r.path] = Route(frozenset(r.methods), public=True, limited=False)
    api.openapi_schema = None  # rebuilt with the served models' limits (services.openapi)
    return routes


class GenServeService(bentoml.Service):
    """BentoML's service with the gateway (services.gateway) in front of its whole ASGI app."""

    def to_asgi(self, is_main: bool = True):
        from services.metrics import service_metrics

        return Gateway(super().to_asgi(is_main), Settings.from_env(), edge_routes(app),
                       on_error=lambda endpoint, code: service_metrics().errors.labels(endpoint, code).inc(),
                       on_rate_limited=lambda client, limit: service_metrics().observe_rate_limited(client, limit))


@bentoml.service(name="genserve", workers=1, traffic={"timeout": 900}, service_class=GenServeService)
@bentoml.asgi_app(app, path="/v1")
class GenServe:
    def __init__(self) -> None:
        # Imported here: the runtime loads ONNX Runtime, and metrics must be created
        # after BentoML's worker set up multiprocess Prometheus (see services.metrics).
        from services.metrics import service_metrics
        from services.pipelines.pipeline_gan import GANPipeline
        from services.engine.engine import DiffusionEngine
        from services.engine.prompt_cache import PromptCache
        from services.pipelines.pipeline_stable_diffusion import StableDiffusionPipeline, discover_stable_diffusion
        from services.runtime import create_backend

        log.setLevel(logging.INFO)  # request ids in the log, beside BentoML's access log
        self.settings = Settings.from_env()
        self.metrics = service_metrics()
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
        from services.ratelimit import RateLimiter

        limit = self.settings.rate_limit_image_steps
        self.image_step_limiter = RateLimiter(limit) if limit is not None else None
        self._document_api()
        log.info("genserve ready: backend=%s models=%s", self.backend.name, sorted(self.backend.models()))

    def _document_api(self) -> None:
        """The OpenAPI page states the served models' limits, and has working examples."""
        from services.openapi import install

        models = [e.pipeline.models for e in self.engines.values()]
        default = self.engines.get(self.settings.default_diffusion_model)
        install(app, sides=[side_limits(m) for m in models],
                num_classes=[p.info.num_classes for p in self.gan.values() if p.info.num_classes],
                prompt_tokens=[m.max_length for m in models],
                image_example=default and default.pipeline.models)

    @bentoml.on_startup
    async def _warm_up(self) -> None:
        """Times one denoising step per engine, so the first Retry-After is an estimate."""
        for engine in self.engines.values():
            if hasattr(engine, "warmup"):
                await engine.warmup()

    async def __is_ready__(self) -> bool:
        return await self.backend.is_ready()

    @app.post("/gan/generate", response_model=GANGenerateResponse, responses=error_responses())
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
        seed = resolve_seed(body.seed, body.num_images)

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

    @app.post("/txt2img", response_model=DiffusionResponse, responses=error_responses())
    async def txt2img(self, body: Txt2ImgRequest, request: Request) -> DiffusionResponse:
        """Text to image with latent diffusion and classifier-free guidance."""
        return await self._diffuse("txt2img", body, request)

    @app.post("/img2img", response_model=DiffusionResponse, responses=error_responses(),
              openapi_extra=body_schema(Img2ImgRequest))
    async def img2img(self, request: Request) -> DiffusionResponse:
        """Image to image: the input image noised to `strength`, then denoised toward the prompt.
        JSON (image as base64) or multipart/form-data (image as a file)."""
        return await self._diffuse("img2img", await parse_body(request, Img2ImgRequest), request)

    @app.post("/inpaint", response_model=DiffusionResponse, responses=error_responses(),
              openapi_extra=body_schema(InpaintRequest))
    async def inpaint(self, request: Request) -> DiffusionResponse:
        """Repaints the white area of `mask`, keeping the rest of `image` (latent blending)."""
        return await self._diffuse("inpaint", await parse_body(request, InpaintRequest), request)

    async def _diffuse(self, task: str, body, request: Request) -> DiffusionResponse:
        """Validates, queues on the pipeline's engine, waits (leaving the batch if the
        client goes away), and answers with the images and everything that reproduces them."""
        start = time.perf_counter()
        name, handle, params = await self._submit(task, body)
        engine = self.engines[name]
        while not handle.status.finished:
            try:
                await asyncio.wait_for(handle.done.wait(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(handle)  # leaves at the next step; nobody reads the answer
                    raise ClientDisconnected()
        return self._respond(task, name, body, params, handle, start)

    async def _submit(self, task: str, body):
        from services.diffusion_requests import build_request, image_steps
        from services.engine.scheduler import QueueFull
        from services.pipelines.pipeline_stable_diffusion import PromptTooLong

        name = body.model or self.settings.default_diffusion_model
        if name not in self.engines:
            raise ModelNotFound(f"model {name!r} is not a diffusion pipeline served here", field="model",
                                allowed=sorted(self.engines))
        if self.engines[name].backend_down:  # requests in flight wait for it; new ones need not
            raise BackendUnavailable(f"the {self.backend.name} backend is unavailable; requests in flight resume "
                                     "when it is back", retry_after_s=2)
        timeout_s = body.timeout_s or self.settings.request_timeout_s
        if timeout_s > self.settings.max_request_timeout_s:
            raise InvalidRequest(f"timeout_s must be at most {self.settings.max_request_timeout_s}",
                                 field="timeout_s", limit=self.settings.max_request_timeout_s)
        models = self.engines[name].pipeline.models
        if task == "txt2img":
            request, params = build_request(task, body, models)
        else:  # decoding images is CPU work: off the event loop
            request, params = await asyncio.to_thread(build_request, task, body, models)
        params["timeout_s"] = timeout_s
        self._charge_image_steps(image_steps(request))
        try:
            handle = self.engines[name].submit(request, timeout_s, getattr(body, "preview_every", 0))
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), field=exc.field_name, limit=exc.limit) from None
        except QueueFull as exc:
            raise TooManyRequests(f"the {name} queue is full ({exc}); retry in {exc.retry_after_s}s",
                                  limit=exc.limit, headers={"Retry-After": str(exc.retry_after_s)}) from None
        return name, handle, params

    def _charge_image_steps(self, cost: int) -> None:
        """GENSERVE_RATE_LIMIT_IMAGE_STEPS: diffusion work per key, in image-steps."""
        if self.image_step_limiter is None:
            return
        limit = self.image_step_limiter.rate
        if cost > limit.count:
            raise InvalidRequest(f"this request costs {cost} image-steps (steps x images); a key may spend at "
                                 f"most {limit} image-steps", field="num_inference_steps", limit=int(limit.count))
        client = client_var.get()
        wait = self.image_step_limiter.acquire(client, cost)
        if wait > 0:
            from services.ratelimit import retry_after

            self.metrics.observe_rate_limited(client, "image_steps")
            raise RateLimited(f"more than {limit} diffusion image-steps; retry in {retry_after(wait)}s",
                              limit=str(limit), headers={"Retry-After": str(retry_after(wait))})

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

    @app.post("/txt2img/stream", response_class=StreamingResponse, responses={
        200: {"description": "Server-sent events: progress, preview, then result or error.",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}}, **error_responses()})
    async def txt2img_stream(self, body: Txt2ImgStreamRequest) -> StreamingResponse:
        """Server-sent events: `progress` per step (step, total, elapsed), `preview` every
        `preview_every` steps (the current x0 estimate as images), then `result` (the
        txt2img response) or `error`. Closing the connection cancels the request."""
        start = time.perf_counter()
        name, handle, params = await self._submit("txt2img", body)
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

    @app.get("/models", response_model=ModelList, responses=error_responses(GET_ERRORS))
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
                    "timeout_s": {"default": self.settings.request_timeout_s, "min": MIN_TIMEOUT_S,
                                  "max": self.settings.max_request_timeout_s},
                },
            ))
        return ModelList(default_models={"gan": self.settings.default_gan_model,
                                         "diffusion": self.settings.default_diffusion_model}, models=models)
