"""The api's settings, read once at start."""

from __future__ import annotations

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from api_service.auth import ApiKeys, InvalidApiKeySetting, is_loopback, parse_api_keys
from pipeline_shared.settings import (
    DatabaseUrl,
    PipelineSettings,
    WorkerSettings,
    metrics_port_field,
    url_secrets,
)

EVENT_GROWTH = 10
"""How much larger than its request a job's events may be: a number can take 4.5 times its
bytes when written again (``1e15`` becomes ``1000000000000000.0``), and ``DataProcessed``
carries the data twice when the result repeats it (``echo``)."""


DEFAULT_DATABASE_URL = "sqlite:///api-state.sqlite3"
DATABASE_URL_DESCRIPTION = (
    "Where job records and idempotency keys live: a SQLite file for one host (the api "
    "and status-service share it), or a postgresql:// URL that api replicas share."
)


class ApiSettings(PipelineSettings):
    api_host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(default=8000, ge=1, le=65535, description="Port the API listens on.")
    max_request_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request body accepted; bigger gets 413."
    )
    max_batch_jobs: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Most jobs one POST /jobs/batch may hold; more gets 422.",
    )
    max_batch_request_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest POST /jobs/batch body accepted; bigger gets 413. Each of its jobs "
        "is still held to MAX_REQUEST_BYTES.",
    )
    request_timeout_seconds: float = Field(
        default=15.0,
        gt=0,
        le=3600,
        description="How long a client may take to send its request body; slower gets 408.",
    )
    api_keys: SecretStr | None = Field(
        default=None,
        validate_default=True,
        description="Comma-separated API keys, each plain or sha256:<hex digest>; required "
        "unless API_HOST is a loopback address.",
    )
    database_url: DatabaseUrl = Field(
        default=DEFAULT_DATABASE_URL, description=DATABASE_URL_DESCRIPTION
    )
    job_retention_days: float = Field(
        default=30.0, gt=0, description="Job records older than this are deleted."
    )
    idempotency_key_hours: float = Field(
        default=24.0, ge=24, description="How long an Idempotency-Key is remembered."
    )

    @model_validator(mode="after")
    def _events_can_carry_a_request(self) -> ApiSettings:
        needed = EVENT_GROWTH * self.max_request_bytes
        if self.max_event_bytes < needed:
            raise ValueError(
                f"MAX_EVENT_BYTES ({self.max_event_bytes}) must be at least {EVENT_GROWTH} times "
                f"MAX_REQUEST_BYTES ({self.max_request_bytes}), or a job the api accepts could "
                f"be too large for the next stage; for example MAX_EVENT_BYTES={needed}"
            )
        return self

    @model_validator(mode="after")
    def _a_batch_can_carry_any_job(self) -> ApiSettings:
        # Each job in a batch is held to MAX_REQUEST_BYTES (so the rule above covers
        # its events); a batch body smaller than that would refuse jobs POST /jobs takes.
        if self.max_batch_request_bytes < self.max_request_bytes:
            raise ValueError(
                f"MAX_BATCH_REQUEST_BYTES ({self.max_batch_request_bytes}) must be at least "
                f"MAX_REQUEST_BYTES ({self.max_request_bytes}), or a job POST /jobs accepts "
                "could not be sent in a batch"
            )
        return self

    @field_validator("api_keys")
    @classmethod
    def _keys_unless_loopback(
        cls, value: SecretStr | None, info: ValidationInfo
    ) -> SecretStr | None:
        raw = value.get_secret_value() if value is not None else ""
        try:
            digests = parse_api_keys(raw)
        except InvalidApiKeySetting as exc:
            raise ValueError(str(exc)) from None
        host = info.data.get("api_host", "127.0.0.1")
        if not digests and not is_loopback(host):
            raise ValueError(
                f"is required when API_HOST ({host}) is not a loopback address: "
                "an open api would be an open email relay"
            )
        return value

    def secret_values(self) -> list[str]:
        raw = self.api_keys.get_secret_value() if self.api_keys is not None else ""
        plain = [
            k.strip() for k in raw.split(",") if k.strip() and not k.strip().startswith("sha256:")
        ]
        return [*super().secret_values(), *plain, *url_secrets(self.database_url)]

    @property
    def keys(self) -> ApiKeys:
        raw = self.api_keys.get_secret_value() if self.api_keys is not None else ""
        return ApiKeys(parse_api_keys(raw))


class StatusSettings(WorkerSettings):
    """status-service's settings: the api's store, and how it follows the job events."""

    metrics_port: int = metrics_port_field(9103)
    database_url: DatabaseUrl = Field(
        default=DEFAULT_DATABASE_URL, description=DATABASE_URL_DESCRIPTION
    )
    status_prefetch: int = Field(
        default=64,
        ge=1,
        le=10_000,
        description="Messages of job events the read model holds unacknowledged, and events "
        "it records at once.",
    )

    def secret_values(self) -> list[str]:
        return [*super().secret_values(), *url_secrets(self.database_url)]
