"""The processor's composition root and console entry point."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from pipeline_shared import tracing
from pipeline_shared.events import JobRequested
from pipeline_shared.logs import configure_service_logging
from pipeline_shared.messaging import Broker
from pipeline_shared.probe_server import serving_probes
from pipeline_shared.settings import load_settings
from pipeline_shared.topology import PROCESSOR
from pipeline_shared.worker import run_until_signalled, serve_stage
from processor_service.handlers import ProcessJob
from processor_service.settings import ProcessorSettings
from processor_service.steps import INLINE_STEPS, STEPS

SERVICE = "processor-service"


async def serve(settings: ProcessorSettings, stop: asyncio.Event) -> None:
    broker = Broker.from_settings(settings, app_id=SERVICE)
    async with serving_probes(settings, broker, SERVICE) as readiness:
        with ThreadPoolExecutor(settings.processing_threads, thread_name_prefix="step") as executor:
            handler = ProcessJob(
                broker,
                executor,
                steps=STEPS,
                inline=INLINE_STEPS,
                delay_seconds=settings.processing_delay_seconds,
                max_event_bytes=settings.max_event_bytes,
            )
            await serve_stage(
                broker,
                PROCESSOR,
                JobRequested,
                handler,
                prefetch=settings.processor_prefetch,
                max_event_bytes=settings.max_event_bytes,
                handler_timeout=settings.handler_timeout_seconds,
                shutdown_timeout=settings.shutdown_timeout_seconds,
                stop=stop,
                on_consuming=readiness.watch,
            )


def main() -> None:
    settings = load_settings(ProcessorSettings, SERVICE)
    configure_service_logging(settings, SERVICE)
    with tracing.configured(SERVICE):
        run_until_signalled(lambda stop: serve(settings, stop))
