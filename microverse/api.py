"""The FastAPI app that ``service.py`` mounts into BentoML: the routers, the error handlers, the API-key check.

Every route that makes a video shares one submission path (validation -> durable job -> batch worker,
``microverse.submission``), so ``/generate`` and ``/v1/videos`` batch together.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI

from .deps import check_api_key
from .errors import install_handlers
from .routers import generate, health, judge, models, ui, videos

logger = logging.getLogger(__name__)


def create_app() -> FastAPI:
    """The FastAPI app; ``app.state.runtime`` is set by whoever starts the service."""
    app = FastAPI(title="MicroVerse", version="0.1.0",
                  description="Text-to-video for micro-world simulation (Wan2.1 architecture).")
    install_handlers(app)
    app.middleware("http")(check_api_key)
    for surface in (generate, health, judge, models, videos, ui):
        app.include_router(surface.router)
    return app
