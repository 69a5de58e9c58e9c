"""The mailer's composition root and console entry point."""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy.exc import SQLAlchemyError

from mailer_service.batching import BatchingTransport, BatchLimits
from mailer_service.compose import Sender
from mailer_service.handlers import SendEmail
from mailer_service.ledger import LedgerUnavailable, SqlLedger
from mailer_service.mailtrap_transport import MailtrapTransport
from mailer_service.metrics import MeasuredTransport
from mailer_service.outbox import OutboxTransport
from mailer_service.send_budget import SendBudget
from mailer_service.settings import MailerSettings
from mailer_service.transport import EmailTransport
from pipeline_shared import tracing
from pipeline_shared.events import DataProcessed
from pipeline_shared.logs import configure_service_logging
from pipeline_shared.messaging import Broker
from pipeline_shared.probe_server import serving_probes
from pipeline_shared.settings import load_settings, redact_url
from pipeline_shared.topology import MAILER
from pipeline_shared.worker import run_until_signalled, serve_stage

SERVICE = "mailer-service"
PURGE_INTERVAL_SECONDS = 3600
# Part of the stop's budget: a database that does not answer must not hold the exit.
LEAVE_TIMEOUT_SECONDS = 2.0
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
        if settings.mailtrap_account_id is None:
            log.warning(
                "MAILTRAP_ACCOUNT_ID is not set: a send whose outcome is unknown is sent "
                "again after SEND_LEASE_SECONDS without asking Mailtrap's Email Logs"
            )
        mailtrap = MailtrapTransport(
            token=settings.mailtrap_token.get_secret_value(),
            api_host=settings.mailtrap_api_host,
            inbox_id=settings.mailtrap_inbox_id,
            concurrency=settings.mailer_concurrency,
            timeout_seconds=settings.mailtrap_timeout_seconds,
            account_id=settings.mailtrap_account_id,
            general_api_host=settings.mailtrap_general_api_host,
            settle_seconds=settings.reconcile_after_seconds,
            budget=SendBudget.open(
                settings.database_url,
                max_requests=settings.mailtrap_max_requests,
                window_seconds=settings.mailtrap_limit_window_seconds,
            ),
        )
        if not settings.batching:
            return mailtrap
        log.info(
            "batching up to %d emails per request, waiting up to %g ms",
            settings.mailtrap_batch_size,
            settings.batch_wait_ms,
        )
        limits = BatchLimits(
            max_emails=settings.mailtrap_batch_size, wait_seconds=settings.batch_wait_ms / 1000
        )
        return BatchingTransport(mailtrap, limits, concurrency=settings.mailer_concurrency)
    if settings.mailer_transport is None:
        log.warning(
            "MAILTRAP_TOKEN is not set: writing emails to %s instead of sending them",
            settings.outbox_dir.resolve(),
        )
    return OutboxTransport(settings.outbox_dir)


async def open_ledger(settings: MailerSettings) -> SqlLedger:
    try:
        ledger = await asyncio.to_thread(
            SqlLedger.open, settings.database_url, lease_seconds=settings.send_lease_seconds
        )
    except SQLAlchemyError as exc:
        raise SystemExit(
            f"{SERVICE}: cannot open the ledger at {redact_url(settings.database_url)}: "
            f"{type(exc).__name__}"
        ) from exc
    log.info("ledger of sent emails at %s", redact_url(settings.database_url))
    return ledger


async def purge_ledger(ledger: SqlLedger, retention_days: float) -> None:
    """Forget sent emails older than the retention, now and then every hour."""
    while True:
        try:
            purged = await ledger.purge_sent_before(time.time() - retention_days * 86400)
            if purged:
                log.info("forgot %d sent email(s) older than %g days", purged, retention_days)
        except SQLAlchemyError as exc:
            log.warning("could not purge the ledger: %s", type(exc).__name__)
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


async def renew_claims(ledger: SqlLedger, every: float) -> None:
    """The heartbeat: keep this mailer's claims alive, however slow its sends."""
    failing = False
    while True:
        await asyncio.sleep(every)
        try:
            await ledger.heartbeat()
        except LedgerUnavailable as exc:
            if not failing:
                log.warning("could not renew this mailer's claims (%s); trying again", exc)
            failing = True
            continue
        if failing:
            log.info("renewing this mailer's claims again")
        failing = False


async def serve(settings: MailerSettings, stop: asyncio.Event) -> None:
    ledger = await open_ledger(settings)
    purging = asyncio.create_task(purge_ledger(ledger, settings.ledger_retention_days))
    renewing = asyncio.create_task(renew_claims(ledger, settings.heartbeat_seconds))
    broker = Broker.from_settings(settings, app_id=SERVICE)
    transport = MeasuredTransport(build_transport(settings))
    sender = Sender(settings.mail_from, settings.mail_from_name, settings.mail_category)
    send_email = SendEmail(
        transport, broker, ledger, sender, lease_seconds=settings.send_lease_seconds
    )
    try:
        async with serving_probes(settings, broker, SERVICE) as readiness:
            await serve_stage(
                broker,
                MAILER,
                DataProcessed,
                send_email,
                prefetch=settings.prefetch,
                max_event_bytes=settings.max_event_bytes,
                handler_timeout=settings.handler_timeout_seconds,
                shutdown_timeout=settings.shutdown_timeout_seconds,
                stop=stop,
                on_consuming=readiness.watch,
            )
    finally:
        purging.cancel()
        renewing.cancel()
        await send_email.close()
        await transport.close()
        await leave_uncertain(ledger)
        await ledger.close()


async def leave_uncertain(ledger: SqlLedger) -> None:
    """At a stop, the claims still held are sends that may be at the provider: mark
    them uncertain, so the next mailer settles them at once instead of after the lease."""
    try:
        left = await asyncio.wait_for(ledger.leave_uncertain(), timeout=LEAVE_TIMEOUT_SECONDS)
    except (LedgerUnavailable, TimeoutError) as exc:
        log.warning("could not mark the sends in flight uncertain (%s); their claims lapse", exc)
        return
    if left:
        log.info("left %d send(s) in flight uncertain, to be settled by the next attempt", left)


def main() -> None:
    settings = load_settings(MailerSettings, SERVICE)
    configure_service_logging(settings, SERVICE)
    with tracing.configured(SERVICE):
        run_until_signalled(lambda stop: serve(settings, stop))
