"""`/v1/models`: the curated models (with availability on this machine) and spec schemes."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from digin.api.deps import SettingsDep, get_tenant
from digin.api.problems import problem_responses
from digin.api.schemas import ModelList, ModelPublic
from digin.core.params import KINDS
from digin.core.registry import is_allowed, list_models, list_schemes

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get(
    "",
    summary="List models and spec schemes",
    dependencies=[Depends(get_tenant)],
    responses=problem_responses(401),
)
def get_models(settings: SettingsDep) -> ModelList:
    allow = settings.model_allow_list
    models = [
        ModelPublic(**info.model_dump(), allowed=is_allowed(info.spec, allow))
        for info in list_models()
    ]
    return ModelList(models=models, schemes=list_schemes(), allow_list=allow, kinds=list(KINDS))
