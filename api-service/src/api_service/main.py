"""The api's console entry point."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from api_service.app import SERVICE, create_app
from api_service.http_protocol import protocol_with_header_deadline
from api_service.settings import ApiSettings
from pipeline_shared import tracing
from pipeline_shared.heap import settle_heap
from pipeline_shared.logs import configure_service_logging
from pipeline_shared.settings import load_settings
from pipeline_shared.worker import STOP_SIGNALS, ignore_stop_signals


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    ignore_stop_signals()
    raise SystemExit(0)


def main() -> None:
    settings = load_settings(ApiSettings, SERVICE)
    configure_service_logging(settings, SERVICE)
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then raises the signal
    # again against the handlers it found; these make that a clean exit 0,
    # which is what process supervisors expect from a requested stop.
    for signum in STOP_SIGNALS:
        signal.signal(signum, _exit_cleanly)
    with tracing.configured(SERVICE):
        app = create_app(settings)
        settle_heap()
        uvicorn.run(
            app,
            host=settings.api_host,
            port=settings.api_port,
            log_config=None,
            timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
            http=protocol_with_header_deadline(
                settings.request_timeout_seconds,
                max(settings.max_request_bytes, settings.max_batch_request_bytes),
            ),
        )
