"""The mailer's settings, read once at start."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from pipeline_shared.contract import NAME_MAX_LENGTH, SenderAddress, SingleLine
from pipeline_shared.settings import DatabaseUrl, WorkerSettings, metrics_port_field, url_secrets

Transport = Literal["mailtrap", "outbox"]

_HOST_PORT = re.compile(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?")

BATCHING_PREFETCH = 250
"""Messages a batching mailer holds by default (``MAILER_PREFETCH``)."""


class MailerSettings(WorkerSettings):
    metrics_port: int = metrics_port_field(9102)
    mailer_transport: Transport | None = Field(
        default=None,
        description="mailtrap or outbox; by default mailtrap when MAILTRAP_TOKEN is set, "
        "else outbox.",
    )
    mailtrap_token: SecretStr | None = Field(
        default=None, validate_default=True, description="Mailtrap API token."
    )
    mailtrap_api_host: str | None = Field(
        default=None,
        description="Override of the SDK's sending host, host:port (the SDK calls https://{host}/api/send).",
    )
    mailtrap_inbox_id: str | None = Field(
        default=None,
        description="Mailtrap sandbox inbox id: when set, emails go to that test inbox.",
    )
    mailtrap_account_id: str | None = Field(
        default=None,
        pattern=r"^[0-9]{1,20}$",
        description="Mailtrap account id: lets the mailer ask the Email Logs API whether a "
        "send whose outcome is unknown went out, instead of sending it again.",
    )
    mailtrap_general_api_host: str = Field(
        default="mailtrap.io",
        description="Host of Mailtrap's general API (Email Logs), host:port.",
    )
    reconcile_after_seconds: float = Field(
        default=60.0,
        ge=0,
        le=3600,
        description="How long after an uncertain send the Email Logs are asked about it "
        "(they show an accepted email only after a delay).",
    )
    mail_from: SenderAddress = Field(
        default="pipeline@example.com",
        validate_default=True,
        description="Sender address; any valid address (the provider decides what it sends from).",
    )
    mail_from_name: SingleLine = Field(
        default="Email pipeline", max_length=NAME_MAX_LENGTH, description="Sender display name."
    )
    mail_category: SingleLine = Field(
        default="background-job", max_length=255, description="Mailtrap category of every email."
    )
    outbox_dir: Path = Field(
        default=Path("outbox"), description="Where the outbox transport writes .eml files."
    )
    mailer_concurrency: int = Field(
        default=8, ge=1, le=256, description="Emails sent at the same time (worker threads)."
    )
    mailer_prefetch: int | None = Field(
        default=None,
        ge=1,
        le=10_000,
        description="Unacknowledged messages a mailer may hold; by default 250 when "
        "batching, else twice MAILER_CONCURRENCY.",
    )

    database_url: DatabaseUrl = Field(
        default="sqlite:///mailer-state.sqlite3",
        description="The ledger of sent emails: a SQLite file for one host, or a "
        "postgresql:// URL that replicas on several hosts share.",
    )
    mailtrap_batch_size: int = Field(
        default=500,
        ge=1,
        le=500,
        description="Emails per Mailtrap batch request at most (the API takes 500); 1 sends "
        "each email in a request of its own.",
    )
    mailtrap_max_requests: int = Field(
        default=150,
        ge=1,
        le=100_000,
        description="Provider requests allowed per MAILTRAP_LIMIT_WINDOW_SECONDS for the "
        "token, summed over every mailer replica sharing DATABASE_URL.",
    )
    mailtrap_limit_window_seconds: float = Field(
        default=10.0, gt=0, le=3600, description="The window of MAILTRAP_MAX_REQUESTS."
    )
    batch_wait_ms: float = Field(
        default=20,
        ge=0,
        le=1000,
        description="How long an email waits for others to share its batch request.",
    )
    mailtrap_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=300,
        description="How long one provider request may take (to connect, and again to read "
        "the answer) before it is given up.",
    )
    send_lease_seconds: float = Field(
        default=15.0,
        ge=1,
        le=3600,
        description="How long a claim on a job outlives the last sign of life of the mailer "
        "holding it; a live mailer renews its claims every third of it.",
    )
    ledger_retention_days: float = Field(
        default=7.0, gt=0, description="How long the ledger remembers a sent email."
    )

    @model_validator(mode="after")
    def _a_send_fits_in_a_handling(self) -> MailerSettings:
        needed = self.mailtrap_timeout_seconds + self.publish_timeout_seconds
        if self.handler_timeout_seconds <= needed:
            # Otherwise a send still waiting for the provider would be cancelled.
            raise ValueError(
                f"HANDLER_TIMEOUT_SECONDS ({self.handler_timeout_seconds:g}) must be longer than "
                f"MAILTRAP_TIMEOUT_SECONDS plus PUBLISH_TIMEOUT_SECONDS ({needed:g}); for "
                f"example HANDLER_TIMEOUT_SECONDS={2 * needed:g}"
            )
        return self

    @field_validator("mailtrap_token")
    @classmethod
    def _token_when_mailtrap(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        if info.data.get("mailer_transport") == "mailtrap" and not (
            value and value.get_secret_value()
        ):
            raise ValueError("is required when MAILER_TRANSPORT=mailtrap")
        return value

    @field_validator("mailtrap_api_host", "mailtrap_general_api_host")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None and not _HOST_PORT.fullmatch(value):
            raise ValueError("must be host or host:port, without a scheme or path")
        return value

    def secret_values(self) -> list[str]:
        token = [self.mailtrap_token.get_secret_value()] if self.mailtrap_token else []
        return [*super().secret_values(), *token, *url_secrets(self.database_url)]

    @property
    def transport(self) -> Transport:
        if self.mailer_transport is not None:
            return self.mailer_transport
        return "mailtrap" if self.mailtrap_token is not None else "outbox"

    @property
    def heartbeat_seconds(self) -> float:
        """How often a mailer renews its claims: three times per lease."""
        return self.send_lease_seconds / 3

    @property
    def batching(self) -> bool:
        return self.transport == "mailtrap" and self.mailtrap_batch_size > 1

    @property
    def prefetch(self) -> int:
        if self.mailer_prefetch:
            return self.mailer_prefetch
        # Batches can only hold the emails in hand, and an email is in hand for
        # the provider's latency and its turn in the request budget: at 400 emails
        # a second and 150 ms, 100 held capped the pipeline at three quarters of
        # what it did with an instant provider (bench/README.md); 250 covers
        # half a second.
        return (
            max(2 * self.mailer_concurrency, BATCHING_PREFETCH)
            if self.batching
            else 2 * self.mailer_concurrency
        )
