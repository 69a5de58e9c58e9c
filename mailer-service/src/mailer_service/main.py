"""The mailer's composition root and console entry point."""

from __future__ import annotations

import asyncio
import logging

from mailer_service.compose import Sender
from mailer_service.handlers import SendEmail
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.outbox import OutboxTransport
from mailer_service.settings import MailerSettings
from mailer_service.transport import EmailTransport
from pipeline_shared.events import DataProcessed
from pipeline_shared.logs import configure_logging
from pipeline_shared.messaging import Broker
from pipeline_shared.settings import load_settings
from pipeline_shared.topology import MAILER
from pipeline_shared.worker import run_until_signalled, serve_stage

SERVICE = "mailer-service"
log = logging.getLogger("mailer")


def build_transport(settings: MailerSettings) -> EmailTransport:
    if settings.transport == "mailtrap":
        assert settings.mailtrap_token is not None  # the settings refuse mailtrap without one
        mode = (
            f"sandbox inbox {settings.mailtrap_inbox_id}"
            if settings.mailtrap_inbox_id
            else "sending"
        )
        log.info("sending through Mailtrap (%s) with %d threads", mode, settings.mailer_concurrency)
        return MailtrapTransport(
            token=settings.mailtrap_token.get_secret_value(),
            api_host=settings.mailtrap_api_host,
            inbox_id=settings.mailtrap_inbox_id,
            concurrency=settings.mailer_concurrency,
        )
    if settings.mailer_transport is None:
        log.warning(
            "MAILTRAP_TOKEN is not set: writing emails to %s instead of sending them",
            settings.outbox_dir.resolve(),
        )
    return OutboxTransport(settings.outbox_dir)


async def serve(settings: MailerSettings, stop: asyncio.Event) -> None:
    broker = Broker(
        settings.rabbitmq_url,
        app_id=SERVICE,
        publish_timeout=settings.publish_timeout_seconds,
        retry_delays=settings.retry_delays,
    )
    transport = build_transport(settings)
    sender = Sender(settings.mail_from, settings.mail_from_name, settings.mail_category)
    try:
        await serve_stage(
            broker,
            MAILER,
            DataProcessed,
            SendEmail(transport, broker, sender),
            prefetch=settings.prefetch,
            max_event_bytes=settings.max_event_bytes,
            shutdown_timeout=settings.shutdown_timeout_seconds,
            stop=stop,
        )
    finally:
        await transport.close()


def main() -> None:
    settings = load_settings(MailerSettings, SERVICE)
    configure_logging(settings.log_level)
    run_until_signalled(lambda stop: serve(settings, stop))
