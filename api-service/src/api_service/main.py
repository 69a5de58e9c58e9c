"""The api's console entry point."""

from __future__ import annotations

import uvicorn

from api_service.app import SERVICE, create_app
from api_service.settings import ApiSettings
from pipeline_shared.logs import configure_logging
from pipeline_shared.settings import load_settings


def main() -> None:
    settings = load_settings(ApiSettings, SERVICE)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_seconds),
    )
