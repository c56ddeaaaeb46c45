"""``GET /info``: what the service runs. BentoML itself serves ``/livez``, ``/readyz`` and ``/metrics``
(``service.py`` hooks readiness and the ``microverse_*`` metrics into them)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter

from ..deps import RuntimeDep

logger = logging.getLogger(__name__)

router = APIRouter()


@router.get("/info", response_model=None)
async def info(rt: RuntimeDep) -> dict[str, Any]:
    """Model source, architecture, dtype, device, attention backend, quantization, versions."""
    return rt.info()
