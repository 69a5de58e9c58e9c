"""The processor's settings, read once at start."""

from __future__ import annotations

from pydantic import Field

from pipeline_shared.settings import WorkerSettings, metrics_port_field


class ProcessorSettings(WorkerSettings):
    metrics_port: int = metrics_port_field(9101)
    processor_prefetch: int = Field(
        default=32, ge=1, le=10_000, description="Unacknowledged messages a processor may hold."
    )
    processing_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        le=300,
        description="Artificial pause per job, mimicking slow work (the tutorial slept 10 s).",
    )
    processing_threads: int = Field(
        default=4, ge=1, le=256, description="Worker threads that run processing steps."
    )
