"""``GET /v1/models``: the served model and its named adapters, in OpenAI's list shape (vLLM's ``root`` /
``parent`` fields say which is which). An adapter's id may be sent as ``model`` on ``/v1/videos``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from ..deps import EngineRuntimeDep

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")


@router.get("/models", response_model=None)
async def list_models(rt: EngineRuntimeDep) -> dict[str, Any]:
    """The base model, then one entry per adapter (``MICROVERSE_LORAS``), each with the model's family and the
    inputs it takes."""
    model = rt.engine.model
    created = int(rt.started_at)
    family = {"family": model.family.name, "inputs": list(model.family.inputs), "image_input": model.family.image}
    base = {"id": model.name, "object": "model", "created": created, "owned_by": "microverse", "root": model.name,
            "parent": None, **family}
    adapters = [{"id": name, "object": "model", "created": created, "owned_by": "microverse", "root": name,
                 "parent": model.name, **family} for name in model.adapters]
    return {"object": "list", "data": [base, *adapters]}
