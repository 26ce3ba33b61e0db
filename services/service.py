"""The genserve BentoML service: `bentoml serve services.service:GenServe`.

BentoML owns the process model, /livez, /readyz (through __is_ready__) and /metrics;
the /v1 API is a FastAPI app mounted into the service, so every endpoint shares one
error shape, request ids, and typed pydantic bodies that appear on the OpenAPI page.
"""

import base64
import logging
import secrets
import time

import bentoml
import numpy as np
from fastapi import FastAPI, Request

from services.config import Settings
from services.errors import InvalidRequest, ModelNotFound
from services.schedulers import SCHEDULERS
from services.http import RequestIdMiddleware, install_error_handlers, parse_body, request_id_var
from services.imaging import FORMATS, decode_image, encode_image, to_uint8
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
)

# Largest output side, as a multiple of the model's native resolution.
MAX_SIDE_FACTOR = 2


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
        self.diffusion = {
            name: StableDiffusionPipeline(self.backend, models)
            for name, models in discover_stable_diffusion(self.backend.models()).items()
        }
        if self.diffusion and self.settings.default_diffusion_model not in self.diffusion:
            raise ValueError(
                f"GENSERVE_DEFAULT_DIFFUSION_MODEL={self.settings.default_diffusion_model!r} is not in the "
                f"repository (diffusion pipelines: {', '.join(self.diffusion)})"
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
    async def txt2img(self, body: Txt2ImgRequest) -> DiffusionResponse:
        """Text to image with latent diffusion and classifier-free guidance."""
        return await self._diffuse("txt2img", body)

    @app.post("/img2img", response_model=DiffusionResponse, openapi_extra=_body_schema(Img2ImgRequest))
    async def img2img(self, request: Request) -> DiffusionResponse:
        """Image to image: the input image noised to `strength`, then denoised toward the prompt.
        JSON (image as base64) or multipart/form-data (image as a file)."""
        return await self._diffuse("img2img", await parse_body(request, Img2ImgRequest))

    @app.post("/inpaint", response_model=DiffusionResponse, openapi_extra=_body_schema(InpaintRequest))
    async def inpaint(self, request: Request) -> DiffusionResponse:
        """Repaints the white area of `mask`, keeping the rest of `image` (latent blending)."""
        return await self._diffuse("inpaint", await parse_body(request, InpaintRequest))

    async def _diffuse(self, task: str, body) -> DiffusionResponse:
        from services.pipelines.pipeline_stable_diffusion import DiffusionRequest, PromptTooLong

        start = time.perf_counter()
        # 1. Check inputs against the chosen pipeline.
        name = body.model or self.settings.default_diffusion_model
        if name not in self.diffusion:
            raise ModelNotFound(f"model {name!r} is not a diffusion pipeline served here", field="model",
                                allowed=sorted(self.diffusion))
        pipeline = self.diffusion[name]
        m = pipeline.models
        if not body.prompt.strip():
            raise InvalidRequest("prompt must not be blank", field="prompt")
        params = body.model_dump(exclude={"model", "image", "mask"})
        params["seed"] = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED + 1)
        init_image = mask = None
        if task == "txt2img":
            params["height"] = body.height or m.native_size
            params["width"] = body.width or m.native_size
        else:
            if m.vae_encoder is None:
                raise InvalidRequest(f"model {name!r} has no VAE encoder: {task} is not available", field="model")
            init_image = self._decode(body.image, m.image_channels, "image")
            params["height"], params["width"] = init_image.shape[1:]
            if task == "inpaint":
                mask = self._decode(body.mask, 1, "mask")[0]
                if mask.shape != init_image.shape[1:]:
                    raise InvalidRequest(
                        f"mask is {mask.shape[1]}x{mask.shape[0]} but image is "
                        f"{init_image.shape[2]}x{init_image.shape[1]}: they must match", field="mask")
                mask = (mask > 0).astype(np.float32)  # white (> mid-grey) = repaint
        limit = MAX_SIDE_FACTOR * m.native_size
        for key in ("height", "width"):
            side, field = params[key], key if task == "txt2img" else "image"
            if side % m.size_multiple or not m.size_multiple <= side <= limit:
                raise InvalidRequest(f"{field} {key} must be a multiple of {m.size_multiple} "
                                     f"from {m.size_multiple} to {limit} pixels, got {side}",
                                     field=field, limit=limit)

        # 2. Generate.
        request = DiffusionRequest(
            prompt=body.prompt, negative_prompt=body.negative_prompt, num_images=body.num_images,
            num_inference_steps=body.num_inference_steps, guidance_scale=body.guidance_scale,
            scheduler=body.scheduler, height=params["height"], width=params["width"], seed=params["seed"],
            init_image=init_image, strength=getattr(body, "strength", 1.0), mask=mask,
        )
        try:
            out = await pipeline(request)
        except PromptTooLong as exc:
            raise InvalidRequest(str(exc), field=exc.field_name, limit=exc.limit) from None

        # 3. Encode, with provenance.
        images = self._encode(out.images, (-1.0, 1.0), body.output_format, [
            {"model": name, "task": task, "seed": seed, "prompt": body.prompt,
             "num_inference_steps": body.num_inference_steps, "guidance_scale": body.guidance_scale,
             "scheduler": body.scheduler} for seed in out.seeds])
        total = self._record(task, name, len(images), start)
        return DiffusionResponse(
            request_id=request_id_var.get(), model=name, backend=self.backend.name, parameters=params,
            images=images, timings={**{k: round(v, 6) for k, v in out.timings.items()}, "total_seconds": round(total, 6)},
        )

    @staticmethod
    def _decode(data: str, channels: int, field: str) -> np.ndarray:
        try:
            raw = base64.b64decode(data, validate=True)
        except ValueError:
            raise InvalidRequest(f"{field} is not valid base64", field=field) from None
        try:
            return decode_image(raw, channels, field)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field=field) from None

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
        for name, pipeline in self.diffusion.items():
            m = pipeline.models
            unet = self.backend.models()[m.unet]
            side = {"multiple_of": m.size_multiple, "min": m.size_multiple,
                    "max": MAX_SIDE_FACTOR * m.native_size, "default": m.native_size}
            models.append(ModelDescription(
                name=name, version=unet.version, pipeline="stable_diffusion",
                endpoint="/v1/txt2img" + (", /v1/img2img, /v1/inpaint" if m.vae_encoder else ""),
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
                },
            ))
        return ModelList(default_models={"gan": self.settings.default_gan_model,
                                         "diffusion": self.settings.default_diffusion_model}, models=models)
