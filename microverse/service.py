"""The BentoML service: HTTP wiring only; everything it serves lives in the ``microverse`` package.

It ships inside the package, so an installed ``microverse`` serves from any directory:
``microverse serve`` runs ``bentoml serve microverse.service:MicroVerse``. The ``service.py`` at the top of
a checkout re-exports it for ``bentoml build`` and ``bentoml serve service:MicroVerse``.
"""

from __future__ import annotations

import logging

import bentoml

with bentoml.importing():
    from .api import create_app
    from .config import Settings
    from .deps import RequireApiKey
    from .lifecycle import ParentWatchdog
    from .runtime import Runtime

logger = logging.getLogger(__name__)
app = create_app()
settings = Settings()
if not logging.getLogger("microverse").handlers:  # BentoML configures its own loggers only
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
    logging.getLogger("microverse").addHandler(_handler)
    logging.getLogger("microverse").setLevel(settings.log_level)
    logging.getLogger("microverse").propagate = False


@bentoml.asgi_app(app, path="/")
@bentoml.service(
    name="microverse",
    workers=1,
    traffic={"timeout": 3600, "max_concurrency": 256},
    # BentoML shows a worker only the GPUs it declares (CUDA_VISIBLE_DEVICES): one per context-parallel rank
    resources={"gpu": settings.context_parallel} if settings.device == "cuda" else {"cpu": "2"},
    http={"cors": {"enabled": bool(settings.cors_origins), "access_control_allow_origins": settings.cors_origins,
                   "access_control_allow_methods": ["GET", "POST", "DELETE"],
                   "access_control_allow_headers": ["Authorization", "Content-Type"]}},
)
class MicroVerse:
    """Text-to-video for micro-world simulation: ``/generate``, ``/v1/videos``, ``/judge``, ``/info``, ``/metrics``."""

    def __init__(self) -> None:
        self.runtime: Runtime | None = None
        # armed before the model loads: a worker whose server was SIGKILLed (no SIGTERM came) stops itself
        self.watchdog = ParentWatchdog(self._stop_runtime).start()
        self.runtime = Runtime.start(Settings())
        app.state.runtime = self.runtime

    def __is_ready__(self) -> bool:
        return self.runtime.ready

    def __metrics__(self, content: str) -> str:
        return content + self.runtime.metrics.render()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.watchdog.shutdown()

    def _stop_runtime(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()


if settings.api_key is not None:  # around BentoML's own routes too (/metrics, /docs.json, /schema.json)
    MicroVerse.add_asgi_middleware(RequireApiKey, key=settings.api_key)
