"""`GET /v1/models`: every served model with its pipeline, endpoint, tensors and limits,
as each family's router describes them."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.context import ServiceContext, context
from services.openapi import GET_ERRORS, error_responses
from services.schemas import ModelList

router = APIRouter()


@router.get("/models", response_model=ModelList, responses=error_responses(GET_ERRORS))
async def list_models(ctx: ServiceContext = Depends(context)) -> ModelList:
    """What is served: each model's pipeline, endpoint, tensors and request limits."""
    models = [m for describe in ctx.describers for m in describe(ctx)]
    s = ctx.settings
    return ModelList(default_models={"gan": s.default_gan_model, "diffusion": s.default_diffusion_model,
                                     "ddpm": s.default_ddpm_model, "vae": s.default_vae_model}, models=models)
