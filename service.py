"""BentoML service: HTTP wiring only. Everything it serves lives in ``microverse``."""

from __future__ import annotations

import logging

import bentoml

with bentoml.importing():
    from microverse.api import create_app
    from microverse.config import Settings
    from microverse.runtime import Runtime

logger = logging.getLogger("microverse.service")
app = create_app()
settings = Settings()


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="microverse",
    workers=1,
    traffic={"timeout": 3600, "max_concurrency": 256},
    resources={"gpu": 1} if settings.device == "cuda" else {"cpu": "2"},
    http={"cors": {"enabled": bool(settings.cors_origins), "access_control_allow_origins": settings.cors_origins,
                   "access_control_allow_methods": ["GET", "POST", "DELETE"],
                   "access_control_allow_headers": ["Authorization", "Content-Type"]}},
)
class MicroVerse:
    """Text-to-video for micro-world simulation: ``/generate``, ``/v1/videos``, ``/judge``, ``/info``, ``/metrics``."""

    def __init__(self) -> None:
        self.runtime = Runtime.start(Settings())
        app.state.runtime = self.runtime

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def __metrics__(self, content: str) -> str:
        return content + self.runtime.metrics.render()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.runtime.stop()
