"""Prometheus metrics of the generation service (appended to BentoML's ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class ServiceMetrics:
    """The service's own metrics in a private registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.generation_seconds = Histogram(
            "microverse_generation_seconds", "Seconds per engine call (one batch), denoise and decode.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800), registry=self.registry,
        )
        self.batch_size = Histogram(
            "microverse_batch_size", "Requests served per engine call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=self.registry,
        )
        self.queue_depth = Gauge("microverse_queue_depth", "Jobs waiting to run.", registry=self.registry)
        self.jobs_total = Counter("microverse_jobs_total", "Jobs finished, by final status.", ["status"],
                                  registry=self.registry)
        self.steps_total = Counter("microverse_steps_total", "Denoising steps run (per engine call).",
                                   registry=self.registry)

    def render(self) -> str:
        """Prometheus text exposition of these metrics."""
        return generate_latest(self.registry).decode()
