"""The genserve BentoML service: `bentoml serve services.service:GenServe`.

Wiring only. BentoML owns the process model, /livez, /readyz (through __is_ready__) and
/metrics; the gateway (services.gateway) stands in front of all of it; the /v1 API is a
FastAPI app mounted into the service, one router per family (services.routers), so every
endpoint shares one error shape, request ids, and typed bodies on the OpenAPI page.
"""

import gc
import importlib
import logging
import os

import bentoml
from fastapi import FastAPI
from starlette.routing import Route as PlainRoute

from services import connections, families, metrics_dir, playground
from services.config import Settings
from services.gateway import Gateway, Route
from services.http import install_error_handlers
from services.memory import freeze_startup_heap
from services.routers import adapters, diffusion, image_to_image, models, openai_images
from services.startup import failure_stops_the_server, supervise

log = logging.getLogger("genserve")

# In a worker: this server's own metrics directory, set before BentoML's app creates any metric.
metrics_dir.use_private_multiprocess_dir()

# Each family router (services.families): its endpoints, and its entries for GET /v1/models.
FAMILY_ROUTERS = tuple(importlib.import_module(module) for module in families.routers())

app = FastAPI(
    title="genserve",
    description="Image generation endpoints. Every error: {'error': {code, message, field?, limit?, request_id}}. "
                "With API keys on, send `Authorization: Bearer <key>` or `X-API-Key: <key>`.",
    version="1",
    docs_url=None,  # /v1/docs is services.playground's: Swagger UI from local files (FastAPI's loads a CDN)
    redoc_url=None,
)
for _module in (*FAMILY_ROUTERS, models, adapters, openai_images):
    app.include_router(_module.router)


def edge_routes(api: FastAPI) -> dict[str, Route]:
    """What the gateway lets through: BentoML's health and metrics, the /v1 API (paths,
    methods and body types as its OpenAPI document states them) and its docs pages."""
    routes = {path: Route(frozenset({"GET"}), public=True, limited=False, drains=False, shaped=False)
              for path in ("/livez", "/readyz", "/healthz", "/metrics")}
    for path, operations in api.openapi()["paths"].items():
        content = set()
        for op in operations.values():
            content |= set(op.get("requestBody", {}).get("content", {}))
        admin = frozenset(m.upper() for m, op in operations.items() if op.get("x-genserve-admin"))
        routes["/v1" + path] = Route(frozenset(m.upper() for m in operations), frozenset(content), admin_methods=admin)
    for r in api.routes:  # the docs pages and openapi.json are plain routes
        if isinstance(r, PlainRoute) and not r.include_in_schema and r.methods:
            routes["/v1" + r.path] = Route(frozenset(r.methods), public=True, limited=False)
    api.openapi_schema = None  # rebuilt with the served models' limits (services.openapi)
    return routes


class GenServeService(bentoml.Service):
    """BentoML's service with the gateway (services.gateway) in front of its whole ASGI app."""

    def to_asgi(self, is_main: bool = True):
        from services.metrics import service_metrics

        with failure_stops_the_server(metrics_dir.release):  # bad settings, say
            settings = Settings.from_env()
            connections.install(settings)  # before BentoML builds uvicorn's Config with this app
            # /v1/images/* (the OpenAI Images API) answers errors in OpenAI's shape, the gateway's too.
            return openai_images.OpenAIErrorShape(Gateway(
                playground.Playground(super().to_asgi(is_main)), settings,
                {**edge_routes(app), **playground.routes()},
                on_error=lambda endpoint, code: service_metrics().errors.labels(endpoint, code).inc(),
                on_rate_limited=lambda client, limit: service_metrics().observe_rate_limited(client, limit)))


@bentoml.service(name="genserve", workers=1, traffic={"timeout": 900}, service_class=GenServeService)
@bentoml.asgi_app(app, path="/v1")
class GenServe:
    @bentoml.on_deployment
    def _supervise() -> None:
        """In the `bentoml serve` process: a worker's failed start stops the server (services.startup)."""
        supervise()

    def __init__(self) -> None:
        with failure_stops_the_server(metrics_dir.release):
            self._start()

    def _start(self) -> None:
        # Imported here: the runtime loads ONNX Runtime, and metrics must be created
        # after BentoML's worker set up multiprocess Prometheus (see services.metrics).
        from services.adapter_library import AdapterLibrary
        from services.context import ServiceContext
        from services.engine import bench_policies
        from services.engine.engine import DiffusionEngine, EngineConfig
        from services.engine.memory import engine_max_rows
        from services.engine.prompt_cache import PromptCache
        from services.memory import MemoryGuard, limit_arenas
        from services.metrics import service_metrics
        from services.pipelines import diffusion_pipelines
        from services.ratelimit import RateLimiter
        from services.runtime import create_backend

        log.setLevel(logging.INFO)  # request ids in the log, beside BentoML's access log
        limit_arenas()  # before the worker threads that run models exist (services.memory)
        settings = Settings.from_env()
        metrics = service_metrics()
        install_error_handlers(app, on_error=lambda path, code: metrics.errors.labels(path, code).inc())
        gc.callbacks.append(metrics.observe_gc)
        backend = create_backend(settings, metrics)
        backend.add_observer(metrics.observe_execution)
        limit = settings.edge.rate_limit_image_steps
        ctx = ServiceContext(settings, backend, metrics, image_step_limiter=RateLimiter(limit) if limit else None,
                             describers=[module.describe for module in FAMILY_ROUTERS],
                             memory=MemoryGuard(settings.memory.limit_mb << 20))

        # 1. The pipelines of the families not run step by step, each family's in its field.
        for family in families.FAMILIES:
            if not family.step_engine:
                setattr(ctx, family.name, family.build_pipelines(backend, settings))
        # 2. One step-level engine per diffusion pipeline, whatever its family; its batch
        #    limit is its denoiser's.
        cache = PromptCache(settings.engine.prompt_cache_size, on_lookup=metrics.observe_prompt_cache)
        ctx.adapters = AdapterLibrary.from_settings(settings.adapters, settings.model_repository,
                                                    metrics.adapter_observer())
        for name, pipeline in diffusion_pipelines(backend, settings).items():
            if pipeline.adapters is not None:
                ctx.adapters.adopt(pipeline.adapters)
            rows = engine_max_rows(backend.models()[pipeline.spec.denoiser])
            config = EngineConfig.from_settings(settings.engine, rows, bench_policies.scheduler_class_from_env(),
                                                denoiser_on_own_cores=backend.computes_on_worker_cores)
            ctx.engines[name] = DiffusionEngine(pipeline, config, prompt_cache=cache,
                                                observer=metrics.engine_observer())
        ctx.adapters.preload()  # the repository's, while they fit GENSERVE_ADAPTER_MEMORY_MB
        self._check_defaults(ctx)
        self.ctx = ctx
        app.state.context = ctx  # what the routers' `context` dependency answers with
        self._document_api()
        log.info("genserve ready: backend=%s models=%s", backend.name, sorted(backend.models()))

    @staticmethod
    def _check_defaults(ctx) -> None:
        """Each family's default model: the configured one (not served: an error said at
        start-up), else the built-in one if served, else the only one served, else none
        (requests must name `model`). A default nobody configured never stops the service."""
        s = ctx.settings
        for group in families.default_models():
            variable = f"GENSERVE_DEFAULT_{group.upper()}_MODEL"
            served = {name: model for family in families.FAMILIES if family.default_model == group
                      for name, model in ctx.served(family).items()}
            default = getattr(s.defaults, group)
            if not served or default in served:
                continue
            if not os.environ.get(variable, "").strip():
                s = s.with_defaults(**{group: next(iter(served)) if len(served) == 1 else None})
                continue
            raise ValueError(f"{variable}={default!r} is not in the repository (served: {', '.join(served)})")
        ctx.settings = s

    def _document_api(self) -> None:
        """The OpenAPI page states the served models' limits, and has working examples."""
        from services.openapi import install

        text = self.ctx.engines_of(*diffusion.TEXT_FAMILIES)
        specs = [e.pipeline.spec for e in text.values()]  # the request bodies with sizes are theirs
        defaults = self.ctx.settings.defaults
        default = text.get(defaults.diffusion) if defaults.diffusion is not None else None
        vae = self.ctx.vae.get(defaults.vae) if defaults.vae is not None else None
        gan_families = families.names(gan=True)  # the class labels GET /v1/models states for the GANs
        gans = [m for describe in self.ctx.describers for m in describe(self.ctx) if m.pipeline in gan_families]
        install(app, sides=[lim for s in specs for lim in s.side_limits().values()],
                num_classes=[m.parameters["class_label"]["max"] + 1 for m in gans if "class_label" in m.parameters],
                prompt_tokens=[t for e in text.values() if (t := getattr(e.pipeline.conditioner, "max_tokens", None))],
                image_example=default.pipeline.spec if default else None,
                vae_example=vae.info if vae else None,
                stylegan_example=next((g.info for g in self.ctx.stylegan.values()), None),
                image_models=image_to_image.example_models(self.ctx))

    @bentoml.on_startup
    async def _warm_up(self) -> None:
        """Times each engine's denoiser by batch rows (its cost model), so the first
        iteration runs the best size and the first Retry-After is an estimate; measures each
        image-to-image model's memory and time per output pixel (its calls and work bound)."""
        with failure_stops_the_server(metrics_dir.release):
            for engine in self.ctx.engines.values():
                await engine.warmup(self.ctx.settings.engine.warmup_budget_s)
        for name, pipeline in self.ctx.image_to_image.items():  # the cost that sizes and bounds requests
            try:
                bytes_per_pixel, seconds_per_pixel = await pipeline.calibrate()
            except Exception as exc:  # an optimisation: requests run unmeasured until their first call
                log.warning("image model %s: calibration skipped (%s: %s)", name, type(exc).__name__, exc)
                continue
            log.info("image model %s: %.0f activation bytes and %.2f us per output pixel", name,
                     bytes_per_pixel, seconds_per_pixel * 1e6)
        # Last: what start-up built stays, and full collections no longer walk it (services.memory).
        self.ctx.metrics.gc_frozen_objects.set(freeze_startup_heap())
        self.ctx.metrics.flush_gc()

    @bentoml.on_shutdown
    async def _close(self) -> None:
        """Stops the engines and closes the backend: on Triton, this process's shared-memory
        regions are unregistered there and removed from /dev/shm (they outlived the service).
        Then this server's metrics directory goes."""
        try:
            for engine in self.ctx.engines.values():
                await engine.close()
            await self.ctx.backend.close()
        finally:
            metrics_dir.release()

    async def __is_ready__(self) -> bool:
        return await self.ctx.backend.is_ready()
