"""`/v1/adapters`: the LoRA adapters each pipeline serves, loaded at run time.

GET lists them (loaded or loadable: rank, targets, bytes, uses) with the memory they take;
POST loads one from a path inside GENSERVE_ADAPTER_DIRS under a name; DELETE unloads one.
POST and DELETE are operators' endpoints: with GENSERVE_ADMIN_KEYS_FILE only its keys may
call them (services.gateway). What loads where, and the memory cap: services.adapter_library.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field

from services.context import ServiceContext, context
from services.errors import InvalidRequest, ModelNotFound
from services.openapi import ADMIN, ADMIN_ERRORS, GET_ERRORS, error_responses
from services.routers.diffusion import TEXT_FAMILIES

router = APIRouter()


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="a LoRA file as published (.safetensors, ...) or a folder `python -m export "
                                  "lora --out` wrote, inside a directory of GENSERVE_ADAPTER_DIRS", max_length=4096)
    name: str | None = Field(None, description="its name in requests' `lora` (default: the file's stem)",
                             max_length=64)
    model: str | None = Field(None, description="the pipeline it adapts (default: the default diffusion model)",
                              max_length=256)


class AdapterList(BaseModel):
    adapters: list[dict[str, Any]] = Field(description="per model and name: loaded or loadable, and when loaded "
                                                       "its ranks, targets (layers per graph), bytes, uses")
    memory: dict[str, int | None] = Field(description="bytes of loaded adapters; limit_bytes: "
                                                      "GENSERVE_ADAPTER_MEMORY_MB (null: no cap)")
    directories: list[str] = Field(description="GENSERVE_ADAPTER_DIRS")


def _adapters(ctx: ServiceContext, model: str | None):
    engines = {n: e for n, e in ctx.engines_of(*TEXT_FAMILIES).items()
               if e.pipeline.adapters is not None and e.pipeline.adapters.serves}
    name = ctx.model_name(model, "diffusion", engines)
    if name not in engines:
        raise ModelNotFound(f"model {name!r} serves no LoRA adapters here (no pipeline with adapter slots of that "
                            "name)", field="model", allowed=sorted(engines))
    return engines[name].pipeline.adapters


@router.get("/adapters", response_model=AdapterList, responses=error_responses(GET_ERRORS))
async def list_adapters(ctx: ServiceContext = Depends(context)) -> AdapterList:
    """Every adapter a request may name, per model: loaded ones with what they take."""
    return AdapterList(**ctx.adapters.describe())


@router.post("/adapters", status_code=201, responses=error_responses(ADMIN_ERRORS), openapi_extra=ADMIN)
async def load_adapter(body: AdapterLoad, ctx: ServiceContext = Depends(context)) -> dict[str, Any]:
    """Loads an adapter now under a name (a later POST of the name reloads it). Requests
    already using the name finish with what they started with."""
    adapters = _adapters(ctx, body.model)
    path = ctx.adapters.allowed(body.path)
    name = body.name or (path.name if path.is_dir() else Path(path).stem)
    start = time.perf_counter()
    entry = await ctx.adapters.register(adapters, name, path)
    return {**entry.describe(adapters, adapters.in_use()), "seconds": round(time.perf_counter() - start, 3)}


@router.delete("/adapters", responses=error_responses(ADMIN_ERRORS), openapi_extra=ADMIN)
async def unload_adapter(name: str = Query(..., max_length=64, description="the adapter's name"),
                         model: str | None = Query(None, max_length=256, description="its pipeline"),
                         ctx: ServiceContext = Depends(context)) -> dict[str, Any]:
    """Unloads an adapter (requests using it finish with it). One still in the repository
    or an allowed directory loads again when a request names it."""
    if not name:
        raise InvalidRequest("name is empty", field="name")
    return {"deleted": ctx.adapters.delete(_adapters(ctx, model), name)}
