"""Settings common to every service, and loading them with one clear error line.

Each process builds one settings object at start (``load_settings``) and
passes values down; nothing else reads the environment.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import AfterValidator, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]
LogFormat = Literal["text", "json"]

DEFAULT_BUNDLE_EVENTS = 64
MAX_BUNDLE_EVENTS = 1000
"""The most events one message may carry: consumers refuse a bundle of more."""

_DATABASE_SCHEMES = ("sqlite://", "postgresql://", "postgres://", "postgresql+")


def _database_url(value: str) -> str:
    if not value.startswith(_DATABASE_SCHEMES):
        raise ValueError("must be a sqlite:// or postgresql:// URL")
    return value


DatabaseUrl = Annotated[str, AfterValidator(_database_url)]
"""A ``sqlite://`` URL (a file, for one host) or a ``postgresql://`` URL (a server
that replicas on several hosts share)."""


class PipelineSettings(BaseSettings):
    """What every service needs: the broker, logging and shutdown bounds.

    Values come from the environment and from a ``.env`` file in the working
    directory (environment variables win).
    """

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    max_event_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        description="Largest message body a consumer accepts (bigger ones are dead-lettered) "
        "and a producer sends.",
    )
    bundle_max_events: int = Field(
        default=DEFAULT_BUNDLE_EVENTS,
        ge=1,
        le=MAX_BUNDLE_EVENTS,
        description="Most events published together in one message (a bundle); 1 sends each "
        "alone, as versions before bundles did (set it while older consumers still run).",
    )
    rabbitmq_url: str = Field(
        default="amqp://guest:guest@localhost:5672/",
        description="AMQP URL of the RabbitMQ broker (amqp:// or amqps://).",
    )
    log_level: LogLevel = Field(default="INFO", description="Logging level.")
    log_format: LogFormat = Field(
        default="text",
        description="How log lines are written: readable text, or one JSON object per line "
        "for a log collector.",
    )
    log_show_addresses: bool = Field(
        default=False,
        description="Show recipient addresses in logs (development); masked otherwise.",
    )
    publish_timeout_seconds: float = Field(
        default=10.0, gt=0, description="How long to wait for the broker to confirm a publish."
    )
    shutdown_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="On SIGTERM, how long in-flight messages may take before they are returned.",
    )

    retry_delays: Annotated[tuple[float, ...], NoDecode] = Field(
        default=(1, 5, 30, 120, 600),
        description="Seconds to wait before each retry of a transiently failed message, "
        "comma-separated; one retry per entry.",
    )

    def secret_values(self) -> list[str]:
        """Values that must never appear in logs; services add their own."""
        return url_secrets(self.rabbitmq_url)

    @field_validator("retry_delays", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("retry_delays")
    @classmethod
    def _positive_delays(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if any(delay <= 0 for delay in value):
            raise ValueError("every delay must be a positive number of seconds")
        return value

    @field_validator("rabbitmq_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in {"amqp", "amqps"} or not parts.hostname:
            raise ValueError("must be an amqp:// or amqps:// URL with a host")
        try:
            parts.port  # noqa: B018 (reading it validates it)
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value


def metrics_port_field(default: int) -> Any:
    """The ``METRICS_PORT`` field, with a worker's own default: each worker has its own,
    so that all of them run on one host (``make run``) without a collision."""
    return Field(
        default=default,
        ge=0,
        le=65535,
        description="Port of the worker's /metrics, /healthz and /readyz endpoint; "
        "0 turns the endpoint off.",
    )


class WorkerSettings(PipelineSettings):
    """What a consuming worker needs on top of the common settings."""

    metrics_host: str = Field(
        default="127.0.0.1",
        min_length=1,
        description="Address the worker's /metrics, /healthz and /readyz endpoint listens on.",
    )
    metrics_port: int = metrics_port_field(0)

    handler_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How long handling one message may take before it is cancelled and "
        "retried as a transient failure.",
    )


class AdminSettings(PipelineSettings):
    """What ``pipeline-admin`` needs on top of the common settings. A class of its
    own, so that the services neither read nor validate what only the command uses."""

    rabbitmq_management_url: str | None = Field(
        default=None,
        description="Base URL of the RabbitMQ management HTTP API; by default "
        "http://<RABBITMQ_URL's host>:15672 (https://...:15671 with amqps://). "
        "Credentials in it win over RABBITMQ_URL's.",
    )

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), *url_secrets(self.rabbitmq_management_url or "")]

    @field_validator("rabbitmq_management_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError("must be an http:// or https:// URL with a host")
            try:
                parts.port  # noqa: B018 (reading it validates it)
            except ValueError:
                raise ValueError("has an invalid port") from None
        return value


S = TypeVar("S", bound=BaseSettings)


def load_settings(cls: type[S], service: str) -> S:
    """Build ``cls`` from the environment, or exit with one line naming the bad variable."""
    try:
        return cls()
    except ValidationError as exc:
        sys.exit(f"{service}: {describe_settings_error(exc)}")


def describe_settings_error(exc: ValidationError) -> str:
    """One line naming each invalid variable, without echoing values (they may be secrets)."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False):
        variable = str(error["loc"][0]).upper() if error["loc"] else "settings"
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["type"] == "missing":
            message = "is required but not set"
        problems.append(f"{variable} {message}")
    return "invalid setting: " + "; ".join(problems)


def url_secrets(url: str) -> list[str]:
    """The password inside ``url``, if any, as written and as decoded."""
    password = urlsplit(url).password
    return [password, unquote(password)] if password else []


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, fit for logs."""
    parts = urlsplit(url)
    userinfo, at, host_port = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    username = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{username}:***@{host_port}"))
