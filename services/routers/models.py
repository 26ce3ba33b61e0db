"""`GET /v1/models`: every served model with its pipeline, endpoint, tensors and limits,
as each family's router describes them; the backend, and on Triton how tensors reach it."""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from services import families
from services.context import ServiceContext, context
from services.openapi import GET_ERRORS, error_responses
from services.schemas import ModelList

router = APIRouter()
STARTED = int(time.time())  # OpenAI's `created` for the served models: when this process loaded them


class OpenAIModel(BaseModel):
    """An entry of OpenAI's model list, so tools that discover models with the OpenAI SDK's
    `models.list()` (and the Images API's `model` field) see what is served."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "genserve"


class SharedMemoryStatus(BaseModel):
    """How tensors reach Triton (GENSERVE_TRITON_SHARED_MEMORY): through shared-memory
    regions, or inside the gRPC messages, and why."""

    mode: Literal["auto", "off", "required"]
    transport: Literal["shared_memory", "socket", "pending"]
    reason: str
    regions: int = Field(description="regions mapped and registered with Triton now")
    region_bytes: int
    region_allocations: int = Field(description="regions ever created (flat once warm)")
    shared_memory_calls: int
    socket_calls: int
    fallbacks: int = Field(description="times the service fell back to the socket")
    recoveries: int = Field(description="times shared memory was re-established mid-run")
    adapter_factor_registrations: int = Field(
        0, description="LoRA factor sets written and registered once for the calls that use them")


class ServedModels(ModelList):
    object: Literal["list"] = "list"
    data: list[OpenAIModel] = Field(description="The same models in OpenAI's list shape (id = name).")
    backend: str = Field(description="onnxruntime (embedded) or triton")
    triton_shared_memory: SharedMemoryStatus | None = Field(None, description="on the Triton backend only")


@router.get("/models", response_model=ServedModels, responses=error_responses(GET_ERRORS))
async def list_models(ctx: ServiceContext = Depends(context)) -> ServedModels:
    """What is served: each model's pipeline, endpoint, tensors and request limits."""
    models = [m for describe in ctx.describers for m in describe(ctx)]
    s = ctx.settings.defaults
    status = getattr(ctx.backend, "shared_memory_status", None)
    return ServedModels(default_models={group: getattr(s, group) for group in families.default_models()},
                        models=models,
                        data=[OpenAIModel(id=m.name, created=STARTED) for m in models],
                        backend=ctx.backend.name, triton_shared_memory=status and SharedMemoryStatus(**status()))
